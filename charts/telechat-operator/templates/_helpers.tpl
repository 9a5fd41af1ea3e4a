{{/*
Chart name, truncated to 63 characters (the DNS label limit) because some Kubernetes name fields are limited to it.
*/}}
{{- define "telechat-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, truncated to 63 characters. If the release name already contains the chart name it is
used as is, so `helm install telechat-operator charts/telechat-operator` does not give "telechat-operator-telechat-operator".
*/}}
{{- define "telechat-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "telechat-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels for every object. Selector labels are a stable subset: a Deployment's selector is immutable, so it must never
carry the chart version.
*/}}
{{- define "telechat-operator.labels" -}}
helm.sh/chart: {{ include "telechat-operator.chart" . }}
{{ include "telechat-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: telechat-operator
{{- end }}

{{/*
Selector labels: only what identifies this release's operator pods.
*/}}
{{- define "telechat-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "telechat-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name of the ServiceAccount the operator runs as.
*/}}
{{- define "telechat-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "telechat-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The namespace the operator watches in namespace scope (defaults to the release namespace).
*/}}
{{- define "telechat-operator.watchNamespace" -}}
{{- default .Release.Namespace .Values.watchNamespace }}
{{- end }}

{{/*
Container image reference: a digest wins over a tag; the tag defaults to the chart's appVersion.
*/}}
{{- define "telechat-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Arguments of `telechat-operator run` (operator/telechat_operator/__main__.py).
*/}}
{{- define "telechat-operator.args" -}}
{{- if eq .Values.scope "namespace" }}
- --namespace={{ include "telechat-operator.watchNamespace" . }}
{{- else }}
- --all-namespaces
{{- end }}
- --liveness=http://0.0.0.0:{{ .Values.health.port }}/healthz
- --metrics-port={{ ternary .Values.metrics.port 0 .Values.metrics.enabled }}
- --log-format={{ .Values.operator.logFormat }}
{{- if .Values.operator.verbose }}
- --verbose
{{- end }}
{{- if .Values.peering.enabled }}
- --peering={{ .Values.peering.name }}
{{- end }}
{{- range .Values.operator.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/*
Name of the metrics Service: the full name with a suffix, still within 63 characters.
*/}}
{{- define "telechat-operator.metricsServiceName" -}}
{{- printf "%s-metrics" (include "telechat-operator.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{/*
Chart name, truncated to 63 characters.
*/}}
{{- define "telechat-inference.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Name of the TeleChatInference, and so of its Service, Deployment and pods: the release name (or fullnameOverride).
Not truncated: the CRD allows at most 40 characters so pod host names fit a DNS label, and a silently shortened
name would not match the Service users were told about; the preflight check fails instead.
*/}}
{{- define "telechat-inference.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride }}
{{- end }}

{{/*
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "telechat-inference.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels for every object this chart renders.
*/}}
{{- define "telechat-inference.labels" -}}
helm.sh/chart: {{ include "telechat-inference.chart" . }}
{{ include "telechat-inference.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: telechat-operator
{{- end }}

{{/*
Selector labels: what identifies this release's objects.
*/}}
{{- define "telechat-inference.selectorLabels" -}}
app.kubernetes.io/name: {{ include "telechat-inference.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Serving image reference: a digest wins over a tag; the tag defaults to the chart's appVersion.
*/}}
{{- define "telechat-inference.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Port of the serving Service (the CRD's default when unset).
*/}}
{{- define "telechat-inference.port" -}}
{{- .Values.port | default 1025 }}
{{- end }}

{{/*
Fail early, with a message naming the value, on values the apiserver would reject later or that contradict each other.
*/}}
{{- define "telechat-inference.preflight" -}}
{{- if not .Values.model }}
{{- fail "model is required: --set model=telechat2-7b (one of the models in values.schema.json)" }}
{{- end }}
{{- if and .Values.checkpoint.path .Values.checkpoint.fromFinetune }}
{{- fail "set only one of checkpoint.path and checkpoint.fromFinetune" }}
{{- end }}
{{- if not (or .Values.checkpoint.path .Values.checkpoint.fromFinetune) }}
{{- fail "set checkpoint.path (a checkpoint inside the pod) or checkpoint.fromFinetune (a TeleChatFinetune's name)" }}
{{- end }}
{{- $name := include "telechat-inference.fullname" . }}
{{- if gt (len $name) 40 }}
{{- fail (printf "the TeleChatInference name %q (release name or fullnameOverride) is longer than 40 characters" $name) }}
{{- end }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "the TeleChatInference name %q (release name or fullnameOverride) must be a DNS-1035 label" $name) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.ingress.enabled (not .Values.ingress.hosts) }}
{{- fail "ingress.enabled needs at least one entry in ingress.hosts" }}
{{- end }}
{{- end }}

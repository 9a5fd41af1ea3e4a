{{/*
Exactly the verbs and resources the operator uses (no wildcards), mirrored from operator/deploy/rbac.yaml; a unit
test fails when the two differ.
Namespaced rules: granted cluster-wide in `cluster` scope and in the watched namespace in `namespace` scope.
*/}}
{{- define "telechat-operator.rules" -}}
# The two custom resources: watched, and read fresh at the start of each pass. kopf writes nothing on them (the
# operator registers only event handlers: no finalizers, no progress annotations).
- apiGroups: ["telechat.io"]
  resources: ["telechatfinetunes", "telechatinferences"]
  verbs: ["get", "list", "watch"]
# Their status is written only through the status subresource: the operator never writes spec.
- apiGroups: ["telechat.io"]
  resources: ["telechatfinetunes/status", "telechatinferences/status"]
  verbs: ["patch"]
# Rank pods (patched to stop a surviving rank in place after a failure), merge pods and the pods of multi-node
# inference groups.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# Headless Services of jobs and groups; Services of inference endpoints.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "create", "patch", "delete"]
# Rendered configs of jobs and inferences.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch", "delete"]
# kopf and the handlers post an Event for every transition (core API).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# Single-node inference replicas run as Deployments.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Gang scheduling with Volcano: a job's PodGroup, created before its pods.
- apiGroups: ["scheduling.volcano.sh"]
  resources: ["podgroups"]
  verbs: ["create"]
{{- if and .Values.peering.enabled (eq .Values.scope "namespace") }}
# kopf peering between operator replicas (namespace scope; cluster scope uses clusterkopfpeerings).
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}

{{/*
Cluster-scoped rules, only in `cluster` scope: kopf follows the CRDs to discover the cluster's resources (it lists
no namespaces when it watches all of them).
*/}}
{{- define "telechat-operator.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if .Values.peering.enabled }}
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}

{{/*
Exactly the verbs and resources the operator uses (no wildcards), mirrored from operator/deploy/rbac.yaml; a unit
test fails when the two differ.
Namespaced rules: granted cluster-wide in `cluster` scope and in the watched namespace in `namespace` scope.
*/}}
{{- define "telechat-operator.rules" -}}
# The two custom resources: watched, annotated by kopf (last handled state), finalizers.
- apiGroups: ["telechat.io"]
  resources: ["telechatfinetunes", "telechatinferences"]
  verbs: ["get", "list", "watch", "patch"]
# Their status is written only through the status subresource: the operator never writes spec.
- apiGroups: ["telechat.io"]
  resources: ["telechatfinetunes/status", "telechatinferences/status"]
  verbs: ["get", "patch"]
# Rank pods (patched to stop a surviving rank in place after a failure), merge pods and the group pods of
# multi-node inference.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Headless Services of jobs and Services of inference endpoints; rendered configs.
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# kopf and the handlers post an Event for every transition.
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
# Single-node inference replicas run as Deployments.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Gang scheduling with Volcano.
- apiGroups: ["scheduling.volcano.sh"]
  resources: ["podgroups"]
  verbs: ["get", "list", "watch", "create", "delete"]
{{- if and .Values.peering.enabled (eq .Values.scope "namespace") }}
# kopf peering between operator replicas (namespace scope; cluster scope uses clusterkopfpeerings).
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}

{{/*
Cluster-scoped rules, only in `cluster` scope: kopf observes namespaces and CRDs to follow the cluster's resources.
*/}}
{{- define "telechat-operator.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- if .Values.peering.enabled }}
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}

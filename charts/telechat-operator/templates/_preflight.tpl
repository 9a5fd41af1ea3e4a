{{/*
Fail early, with a message naming the value, on combinations that would install a broken operator.
*/}}
{{- define "telechat-operator.preflight" -}}
{{- if and .Values.watchNamespace (ne .Values.scope "namespace") }}
{{- fail "watchNamespace is only used with scope=namespace; set scope=namespace or unset watchNamespace" }}
{{- end }}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.peering.enabled) }}
{{- fail "replicaCount > 1 needs peering.enabled=true, otherwise several operators handle the same resources" }}
{{- end }}
{{- if and (not .Values.serviceAccount.create) .Values.rbac.create (not .Values.serviceAccount.name) }}
{{- fail "rbac.create with serviceAccount.create=false needs serviceAccount.name (the account to bind)" }}
{{- end }}
{{- end }}

{{- define "enc.name" -}}
{{- printf "%s-agent" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "enc.labels" -}}
app.kubernetes.io/name: enc-agent
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "enc.selector" -}}
app.kubernetes.io/name: enc-agent
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "enc.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "enc.issuerName" -}}
{{- printf "%s-issuer" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "enc.issuerSelector" -}}
app.kubernetes.io/name: enc-issuer
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "enc.issuerLabels" -}}
{{ include "enc.issuerSelector" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The issuer's Service name as agents dial it; also its serving certificate's DNS SAN. */}}
{{- define "enc.issuerHost" -}}
{{- printf "%s.%s.svc" (include "enc.issuerName" .) .Release.Namespace -}}
{{- end -}}

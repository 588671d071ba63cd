{{- define "scangate.fullname" -}}
{{- printf "%s" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "scangate.labels" -}}
app.kubernetes.io/name: scangate
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "scangate.selector" -}}
app.kubernetes.io/name: scangate
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

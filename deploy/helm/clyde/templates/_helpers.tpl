{{- define "clyde.labels" -}}
app.kubernetes.io/name: clyde
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{- define "clyde.selector" -}}
app.kubernetes.io/name: clyde
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end }}

{{- define "clyde.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end }}

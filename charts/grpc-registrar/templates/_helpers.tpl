{{/* The chart name. */}}
{{- define "grpc-registrar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The full name: release-chart, or the override. */}}
{{- define "grpc-registrar.fullname" -}}
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

{{/* Selector labels. */}}
{{- define "grpc-registrar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "grpc-registrar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Common labels. */}}
{{- define "grpc-registrar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "grpc-registrar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The `annotations:` block of an object's metadata: (list $ $own) renders $own (that object's own
annotations, or nil) over commonAnnotations, or nothing when both are empty. Indent it by 2.
*/}}
{{- define "grpc-registrar.annotations" -}}
{{- $root := index . 0 }}
{{- $all := merge (dict) (index . 1 | default dict) ($root.Values.commonAnnotations | default dict) }}
{{- with $all -}}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The backend, lower-case: `etcd` or `consul` (values accept `Etcd` and `Consul`, as the CRD spells them). */}}
{{- define "grpc-registrar.backend" -}}
{{- lower .Values.backend }}
{{- end }}

{{/*
etcd.endpoints as one comma-separated string: the values accept a list or a string
(`--set etcd.endpoints=http://etcd:2379`, or several separated by commas).
*/}}
{{- define "grpc-registrar.etcdEndpoints" -}}
{{- $endpoints := .Values.etcd.endpoints }}
{{- if kindIs "string" $endpoints }}
{{- $endpoints = splitList "," $endpoints }}
{{- end }}
{{- $clean := list }}
{{- range $endpoints }}
{{- with trim . }}
{{- $clean = append $clean . }}
{{- end }}
{{- end }}
{{- join "," $clean }}
{{- end }}

{{/* The ServiceAccount name. */}}
{{- define "grpc-registrar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "grpc-registrar.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The controller image: repository@digest when a digest is set, else repository:tag. */}}
{{- define "grpc-registrar.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* The PromQL label matchers that select this release's series (see prometheusRule.selector). */}}
{{- define "grpc-registrar.promSelector" -}}
{{- .Values.prometheusRule.selector | default (printf "job=%q" (printf "%s-metrics" (include "grpc-registrar.fullname" .))) }}
{{- end }}

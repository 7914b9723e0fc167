{{/*
Names and labels shared by every template (the helpers `helm create` makes, same names).
*/}}

{{- define "lorafleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name: <release>-lorafleet, or the release name alone when it already contains the chart
name (so `helm install lorafleet charts/lorafleet` names things `lorafleet`, not `lorafleet-lorafleet`).
*/}}
{{- define "lorafleet.fullname" -}}
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

{{- define "lorafleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lorafleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lorafleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lorafleet.labels" -}}
helm.sh/chart: {{ include "lorafleet.chart" . }}
{{ include "lorafleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lorafleet
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "lorafleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lorafleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name: name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lorafleet.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) }}
{{- end }}

{{- define "lorafleet.runtimeImage" -}}
{{- printf "%s:%s" .Values.operator.runtimeImage.repository (default .Chart.AppVersion .Values.operator.runtimeImage.tag) }}
{{- end }}

{{- define "lorafleet.runtimeVllmImage" -}}
{{- printf "%s:%s" .Values.operator.runtimeVllmImage.repository (default .Chart.AppVersion .Values.operator.runtimeVllmImage.tag) }}
{{- end }}

{{- define "lorafleet.minio.fullname" -}}
{{- printf "%s-minio" (include "lorafleet.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
MinIO's root password: the one given, else the one already in the cluster's Secret (so upgrades keep
it), else a new random one.
*/}}
{{- define "lorafleet.minio.rootPassword" -}}
{{- if .Values.minio.rootPassword }}
{{- .Values.minio.rootPassword }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "lorafleet.minio.fullname" .) }}
{{- if and $existing $existing.data (index $existing.data "MINIO_ROOT_PASSWORD") }}
{{- index $existing.data "MINIO_ROOT_PASSWORD" | b64dec }}
{{- else }}
{{- randAlphaNum 32 }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lorafleet.examplePool.endpoint" -}}
{{- if .Values.examplePool.storage.endpoint }}
{{- .Values.examplePool.storage.endpoint }}
{{- else if .Values.minio.enabled }}
{{- printf "http://%s.%s:9000" .Values.minio.serviceName .Release.Namespace }}
{{- else }}
{{- fail "examplePool.storage.endpoint: set the S3 endpoint of the example pool, or set minio.enabled=true to use the bundled MinIO" }}
{{- end }}
{{- end }}

{{/*
The Secret the example pool's sidecars read: an existing one, one the chart writes from the keys
given, or the bundled MinIO's (it carries AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY too).
*/}}
{{- define "lorafleet.examplePool.secretName" -}}
{{- $s := .Values.examplePool.storage }}
{{- if $s.existingSecret }}
{{- $s.existingSecret }}
{{- else if or $s.accessKey $s.secretKey }}
{{- printf "%s-%s-storage" (include "lorafleet.fullname" .) .Values.examplePool.name | trunc 63 | trimSuffix "-" }}
{{- else if .Values.minio.enabled }}
{{- include "lorafleet.minio.fullname" . }}
{{- else }}
{{- fail "examplePool.storage: set existingSecret, or accessKey and secretKey, or minio.enabled=true" }}
{{- end }}
{{- end }}

{{/*
The namespaces the operator watches, as a JSON list: operator.watchNamespaces, plus the release's
namespace when the example pool is on (it lives there). Empty: every namespace.
*/}}
{{- define "lorafleet.watchNamespaces" -}}
{{- $ns := list }}
{{- range .Values.operator.watchNamespaces }}
{{- $ns = append $ns . }}
{{- end }}
{{- if and $ns .Values.examplePool.enabled (not (has .Release.Namespace $ns)) }}
{{- $ns = append $ns .Release.Namespace }}
{{- end }}
{{- toJson $ns }}
{{- end }}

{{/*
"true" when the operator's rights are granted per namespace (Roles in each watched namespace): every
watched namespace is named exactly. Empty watchNamespaces (every namespace) or a glob pattern among
them (namespaces not known at install) need the cluster-wide ClusterRole.
*/}}
{{- define "lorafleet.rbacPerNamespace" -}}
{{- $ns := include "lorafleet.watchNamespaces" . | fromJsonArray }}
{{- $patterns := false }}
{{- range $ns }}
{{- if regexMatch "[*?\\[\\]!]" . }}
{{- $patterns = true }}
{{- end }}
{{- end }}
{{- if and $ns (not $patterns) }}true{{- end }}
{{- end }}

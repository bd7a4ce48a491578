{{/* Names and labels shared by the templates. */}}

{{- define "microserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "microserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "microserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "microserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "microserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "microserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "microserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "microserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-router" (include "microserve.fullname" .)) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "microserve.secretName" -}}
{{- default (printf "%s-auth" (include "microserve.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/* The enabled engine roles, in a fixed order, as a list. */}}
{{- define "microserve.roles" -}}
{{- $roles := list -}}
{{- range $role := list "both" "prefill" "decode" -}}
{{- if (get $.Values.engines $role).enabled -}}
{{- $roles = append $roles $role -}}
{{- end -}}
{{- end -}}
{{- toJson $roles -}}
{{- end -}}

{{/* One role's settings: engineDefaults overridden by engines.<role>. Call with (list $ role). */}}
{{- define "microserve.engine" -}}
{{- $root := index . 0 -}}
{{- $role := index . 1 -}}
{{- toJson (mergeOverwrite (deepCopy $root.Values.engineDefaults) (get $root.Values.engines $role)) -}}
{{- end -}}

{{- define "microserve.engineName" -}}
{{- $root := index . 0 -}}
{{- printf "%s-engine-%s" (include "microserve.fullname" $root) (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "microserve.redisURL" -}}
{{- if .Values.redis.url -}}
{{- .Values.redis.url -}}
{{- else if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:6379" (include "microserve.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "microserve.etcdURL" -}}
{{- if .Values.etcd.url -}}
{{- .Values.etcd.url -}}
{{- else if .Values.etcd.enabled -}}
{{- printf "etcd://%s-etcd:2379" (include "microserve.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The label selector of the engine pods, URL-encoded for k8s:// discovery. */}}
{{- define "microserve.engineSelector" -}}
{{- printf "app.kubernetes.io/name%%3D%s,app.kubernetes.io/instance%%3D%s,app.kubernetes.io/component%%3Dengine" (include "microserve.name" .) .Release.Name -}}
{{- end -}}

{{/* Checks across values that would render a broken release (values.schema.json checks each value);
fail with one line saying what to change. */}}
{{- define "microserve.validate" -}}
{{- $roles := include "microserve.roles" . | fromJsonArray -}}
{{- if not $roles -}}
{{- fail "engines: enable at least one role (both, prefill, decode)" -}}
{{- end -}}
{{- if and (has "prefill" $roles) (not (has "decode" $roles)) -}}
{{- fail "engines: prefill needs decode enabled too (a PD strategy sends each request to one of each)" -}}
{{- end -}}
{{- if and (eq .Values.discovery "etcd") (not (include "microserve.etcdURL" .)) -}}
{{- fail "discovery etcd: set etcd.enabled or etcd.url" -}}
{{- end -}}
{{- end -}}

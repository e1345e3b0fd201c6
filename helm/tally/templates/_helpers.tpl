{{/*
Shared names, labels and container settings. Every per-service template is driven by one entry
of .Values.services; call the helpers below with (dict "root" $ "key" $key "svc" $svc).
*/}}

{{- define "tally.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped prefix of every object name: the release name, plus the chart name unless the release already carries it. */}}
{{- define "tally.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tally.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The service's name in Kubernetes and Prometheus: its values key in kebab-case (paymentGateway -> payment-gateway). */}}
{{- define "tally.component" -}}
{{- kebabcase .key -}}
{{- end -}}

{{- define "tally.componentFullname" -}}
{{- printf "%s-%s" (include "tally.fullname" .root) (include "tally.component" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tally.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion -}}
{{- end -}}

{{/* Labels of objects that belong to the chart as a whole; call with the root context. */}}
{{- define "tally.commonLabels" -}}
helm.sh/chart: {{ include "tally.chart" . }}
app.kubernetes.io/name: {{ include "tally.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ include "tally.imageTag" . | quote }}
app.kubernetes.io/part-of: tally
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels of one service's objects. */}}
{{- define "tally.labels" -}}
{{ include "tally.commonLabels" .root }}
app.kubernetes.io/component: {{ include "tally.component" . }}
{{- end -}}

{{/* The stable subset that selects a service's pods; never changes across upgrades. */}}
{{- define "tally.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tally.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ include "tally.component" . }}
{{- end -}}

{{/*
In-cluster gRPC address of the service block named `.target` (<release>-<service>:<grpcPort>),
for a setting `.setting` of the service `.key`; fails the render when that block is not an
enabled gRPC service, rather than leaving the caller pointed at nothing.
*/}}
{{- define "tally.grpcAddress" -}}
{{- $target := index .root.Values.services .target -}}
{{- if not (and $target $target.enabled (eq $target.kind "grpc")) -}}
{{- fail (printf "services.%s.%s names %q, which is not an enabled gRPC service block" .key .setting .target) -}}
{{- end -}}
{{- printf "%s:%v" (include "tally.componentFullname" (dict "root" .root "key" .target)) $target.grpcPort -}}
{{- end -}}

{{/* Name of the port Prometheus scrapes: gRPC services have a metrics port, HTTP services serve /metrics on theirs. */}}
{{- define "tally.metricsPortName" -}}
{{- if eq .kind "http" }}http{{ else }}metrics{{ end -}}
{{- end -}}

{{- define "tally.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "tally.imageTag" .) -}}
{{- end -}}

{{/*
Settings of one service, as the environment variables its settings class reads
(<envPrefix><SETTING>). Credentials are always secretKeyRefs, never values.
*/}}
{{- define "tally.env" -}}
{{- $root := .root -}}
{{- $key := .key -}}
{{- $svc := .svc -}}
{{- $prefix := $svc.envPrefix -}}
{{- $values := $root.Values -}}
- name: {{ $prefix }}VERSION
  value: {{ include "tally.imageTag" $root | quote }}
{{- if eq $svc.kind "http" }}
- name: {{ $prefix }}HTTP_PORT
  value: {{ $svc.httpPort | quote }}
{{- else }}
- name: {{ $prefix }}GRPC_PORT
  value: {{ $svc.grpcPort | quote }}
- name: {{ $prefix }}METRICS_PORT
  value: {{ $svc.metricsPort | quote }}
{{- end }}
- name: {{ $prefix }}SHUTDOWN_GRACE_SECONDS
  value: {{ $svc.shutdownGraceSeconds | quote }}
- name: {{ $prefix }}LOG_LEVEL
  value: {{ $svc.logLevel | default $values.logLevel | quote }}
{{- if $svc.usesPostgres }}
- name: {{ $prefix }}PG_HOST
  value: {{ $values.postgres.host | quote }}
- name: {{ $prefix }}PG_PORT
  value: {{ $values.postgres.port | quote }}
- name: {{ $prefix }}PG_USER
  value: {{ $values.postgres.user | quote }}
- name: {{ $prefix }}PG_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $values.postgres.passwordSecret.name }}
      key: {{ $values.postgres.passwordSecret.key }}
- name: {{ $prefix }}DB_MAX_CONNECTIONS
  value: {{ $svc.dbMaxConnections | quote }}
{{- end }}
{{- if $svc.usesRabbitmq }}
- name: {{ $prefix }}AMQP_URL
  valueFrom:
    secretKeyRef:
      name: {{ $values.rabbitmq.urlSecret.name }}
      key: {{ $values.rabbitmq.urlSecret.key }}
{{- end }}
- name: {{ $prefix }}JWT_ALGORITHMS
  value: {{ $values.jwt.algorithms | toJson | quote }}
- name: {{ $prefix }}JWT_AUDIENCE
  value: {{ $values.jwt.audience | quote }}
- name: {{ $prefix }}JWT_ISSUER
  value: {{ $values.jwt.issuer | quote }}
{{- with $values.jwt.secret }}
- name: {{ $prefix }}JWT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .key }}
{{- end }}
{{- with $values.jwt.jwksSecret }}
- name: {{ $prefix }}JWT_JWKS_FILE
  value: {{ printf "/etc/tally/jwks/%s" .key | quote }}
{{- end }}
{{- range $name, $target := $svc.grpcTargets }}
- name: {{ printf "%s%s" $prefix $name }}
  value: {{ include "tally.grpcAddress" (dict "root" $root "key" $key "setting" (printf "grpcTargets.%s" $name) "target" $target) | quote }}
{{- end }}
{{- with $svc.upstreams }}
{{- $upstreams := dict }}
{{- range $service, $target := . }}
{{- $_ := set $upstreams $service (include "tally.grpcAddress" (dict "root" $root "key" $key "setting" (printf "upstreams[%s]" $service) "target" $target)) }}
{{- end }}
- name: {{ $prefix }}UPSTREAMS
  value: {{ $upstreams | toJson | quote }}
{{- end }}
{{- range $name, $value := $svc.env }}
- name: {{ printf "%s%s" $prefix $name }}
  value: {{ $value | quote }}
{{- end }}
{{- range $name, $ref := $svc.secretEnv }}
- name: {{ printf "%s%s" $prefix $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.name }}
      key: {{ $ref.key }}
{{- end }}
{{- end -}}

{{/* Volumes every Tally container mounts: a writable /tmp (the root filesystem is read-only) and the JWKS, when configured. */}}
{{- define "tally.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- with .Values.jwt.jwksSecret }}
- name: jwks
  secret:
    secretName: {{ .name }}
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- end }}
{{- end -}}

{{- define "tally.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.jwt.jwksSecret }}
- name: jwks
  mountPath: /etc/tally/jwks
  readOnly: true
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by a service's Deployment and its migration Job; call with the root context. */}}
{{- define "tally.podSpecCommon" -}}
automountServiceAccountToken: false
{{- with .Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end -}}

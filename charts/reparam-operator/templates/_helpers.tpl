{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "reparam-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart unless the release name already contains the chart name. */}}
{{- define "reparam-operator.fullname" -}}
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

{{- define "reparam-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator pod (never change them on upgrade). */}}
{{- define "reparam-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "reparam-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "reparam-operator.labels" -}}
helm.sh/chart: {{ include "reparam-operator.chart" . }}
{{ include "reparam-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: reparam
{{- end }}

{{- define "reparam-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "reparam-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "reparam-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Whether the operator watches every namespace (watchNamespaces empty). */}}
{{- define "reparam-operator.clusterwide" -}}
{{- if not .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/*
The operator's defaults for conversion Jobs, as JSON (REPARAM_JOB_DEFAULTS): the
ModelConversion spec.job fields resources / nodeSelector / tolerations / envFrom and
spec.registry.trackingUri, used where a resource leaves them empty.
*/}}
{{- define "reparam-operator.jobDefaults" -}}
{{- $d := .Values.jobDefaults }}
{{- $job := dict }}
{{- with $d.resources }}{{ $_ := set $job "resources" . }}{{ end }}
{{- with $d.nodeSelector }}{{ $_ := set $job "nodeSelector" . }}{{ end }}
{{- with $d.tolerations }}{{ $_ := set $job "tolerations" . }}{{ end }}
{{- $envFrom := list }}
{{- range $d.envFromSecrets }}{{ $envFrom = append $envFrom (dict "secretRef" (dict "name" .)) }}{{ end }}
{{- with $envFrom }}{{ $_ := set $job "envFrom" . }}{{ end }}
{{- with $d.queueName }}{{ $_ := set $job "queueName" . }}{{ end }}
{{- with $d.priorityClassName }}{{ $_ := set $job "priorityClassName" . }}{{ end }}
{{- $out := dict "job" $job }}
{{- with $d.mlflow.trackingUri }}{{ $_ := set $out "registry" (dict "trackingUri" .) }}{{ end }}
{{- toJson $out }}
{{- end }}

{{/*
The alerting rule groups (a Prometheus rule file's `groups:`), shared by the
PrometheusRule and the chart tests (promtool check rules / test rules).
Metric names: src/reparam/operator/metrics.py.
*/}}
{{- define "reparam-operator.ruleGroups" -}}
{{- $r := .Values.metrics.prometheusRule -}}
groups:
  - name: reparam-operator
    rules:
      - alert: ReparamConversionFailures
        expr: |-
          sum by (outcome) (increase(reparam_conversions_total{outcome=~"failed|validation_failed"}[{{ $r.failureWindow }}])) > 0
        labels:
          severity: {{ $r.severity }}
        annotations:
          summary: "ModelConversions failed in the last {{ $r.failureWindow }}"
          description: >-
            {{ "{{" }} $value | humanize {{ "}}" }} conversions ended with outcome {{ "{{" }} $labels.outcome {{ "}}" }}.
            `kubectl get mconv -A` lists them; status.lastFailure holds the converter's message.
      - alert: ReparamNoRecentSuccess
        expr: |-
          (time() - (max(max_over_time(reparam_last_success_timestamp_seconds[1d]) > 0) or on() max(reparam_operator_start_time_seconds)) > {{ include "reparam-operator.seconds" $r.noSuccessFor }})
          and on() (sum(reparam_conversions_in_progress) + sum(reparam_conversions_queued) > 0)
        for: 15m
        labels:
          severity: {{ $r.severity }}
        annotations:
          summary: "No ModelConversion succeeded for {{ $r.noSuccessFor }} while conversions are pending"
          description: >-
            Conversions are running or queued but none succeeded for {{ $r.noSuccessFor }}:
            Jobs may be stuck (no GPU node, image pull errors) or failing.
      - alert: ReparamReconcileErrors
        expr: |-
          sum by (handler) (increase(reparam_operator_reconcile_errors_total{result="error"}[{{ $r.reconcileErrorWindow }}])) > 0
        labels:
          severity: {{ $r.severity }}
        annotations:
          summary: "reparam operator handler {{ "{{" }} $labels.handler {{ "}}" }} raised unexpected errors"
          description: >-
            {{ "{{" }} $value | humanize {{ "}}" }} unexpected errors in the last {{ $r.reconcileErrorWindow }}; see the operator's log.
{{- end }}

{{/* A Prometheus duration (30s, 15m, 6h, 1d, 1w) in seconds. */}}
{{- define "reparam-operator.seconds" -}}
{{- $d := toString . -}}
{{- $units := dict "s" 1 "m" 60 "h" 3600 "d" 86400 "w" 604800 -}}
{{- $unit := substr (int (sub (len $d) 1)) (len $d) $d -}}
{{- $n := trimSuffix $unit $d -}}
{{- mul (atoi $n) (get $units $unit) -}}
{{- end }}

{{/*
Render-time checks of what the schema cannot express: the same rules the binary applies at
start-up (ElectionConfig::validate in src/leader.rs), so a bad combination fails `helm install`
instead of crash-looping the pods.
*/}}

{{/*
A duration as the binary parses it (`1500ms`, `15s`, `1m`, or bare seconds such as `2.5`), in
milliseconds. Call with (list "the.value.path" $value), so that an error names the value.
*/}}
{{- define "grpc-registrar.durationMs" -}}
{{- $name := index . 0 }}
{{- $s := index . 1 | toString | trim }}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?(ms|s|m)?$" $s) }}
{{- fail (printf "%s: invalid duration %q: use e.g. 1500ms, 15s or 1m" $name $s) }}
{{- end }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $s }}
{{- $unit := trimPrefix $number $s }}
{{- $factor := get (dict "ms" 1 "s" 1000 "m" 60000 "" 1000) $unit }}
{{- mulf (float64 $number) $factor }}
{{- end }}

{{- define "grpc-registrar.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) }}
{{- fail "replicaCount > 1 needs leaderElection.enabled: replicas without an elected leader would fight over the registry" }}
{{- end }}
{{- if .Values.leaderElection.enabled }}
{{- $le := .Values.leaderElection }}
{{- $lease := include "grpc-registrar.durationMs" (list "leaderElection.leaseDuration" $le.leaseDuration) | float64 }}
{{- $renew := include "grpc-registrar.durationMs" (list "leaderElection.renewDeadline" $le.renewDeadline) | float64 }}
{{- $retry := include "grpc-registrar.durationMs" (list "leaderElection.retryPeriod" $le.retryPeriod) | float64 }}
{{- $ttl := mulf (float64 .Values.etcd.leaseTTL) 1000 }}
{{- if or (le $retry 0.0) (ge $retry $renew) }}
{{- fail (printf "leaderElection.retryPeriod (%s) must be positive and shorter than leaderElection.renewDeadline (%s): lower retryPeriod or raise renewDeadline" (toString $le.retryPeriod) (toString $le.renewDeadline)) }}
{{- end }}
{{- if ge $renew $lease }}
{{- fail (printf "leaderElection.renewDeadline (%s) must be shorter than leaderElection.leaseDuration (%s), so a leader stops writing before another may take over: lower renewDeadline or raise leaseDuration" (toString $le.renewDeadline) (toString $le.leaseDuration)) }}
{{- end }}
{{- /* etcd.leaseTTL is LEASE_TTL for either backend, and the binary checks it for both. */}}
{{- if ge $lease $ttl }}
{{- $why := "a new leader re-puts every key before the old etcd lease expires" }}
{{- if eq (include "grpc-registrar.backend" .) "consul" }}
{{- $why = "a new leader renews the controller's Consul node check (whose TTL it is with backend consul) before it lapses" }}
{{- end }}
{{- fail (printf "leaderElection.leaseDuration (%s) must be shorter than etcd.leaseTTL (%vs), so %s: raise etcd.leaseTTL above %s or lower leaderElection.leaseDuration (and renewDeadline, retryPeriod) below %vs" (toString $le.leaseDuration) .Values.etcd.leaseTTL $why (toString $le.leaseDuration) .Values.etcd.leaseTTL) }}
{{- end }}
{{- end }}
{{- $shutdown := include "grpc-registrar.durationMs" (list "shutdownTimeout" .Values.shutdownTimeout) | float64 }}
{{- if ge $shutdown (mulf (float64 .Values.terminationGracePeriodSeconds) 1000) }}
{{- fail (printf "shutdownTimeout (%s) must be shorter than terminationGracePeriodSeconds (%v), or the kubelet kills the controller before it gives up on in-flight work: lower shutdownTimeout or raise terminationGracePeriodSeconds" (toString .Values.shutdownTimeout) .Values.terminationGracePeriodSeconds) }}
{{- end }}
{{- end }}

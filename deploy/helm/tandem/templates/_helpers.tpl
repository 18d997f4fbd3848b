{{/*
Names, labels, and the resolved worker pools.

Every Tandem container runs the image's `tandem` command with one subcommand (router,
prefill, decode) and flags built here from the values. Settings every process must agree on
come from the shared ConfigMap as environment variables and reach the flags through
Kubernetes' $(VAR) expansion, so the ConfigMap is the one place they live.
*/}}

{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tandem.fullname" -}}
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

{{- define "tandem.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select this release's pods (add app.kubernetes.io/component per part). */}}
{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tandem.labels" -}}
helm.sh/chart: {{ include "tandem.chart" . }}
{{ include "tandem.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tandem
{{- end -}}

{{- define "tandem.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "tandem.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tandem.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tandem.sharedConfigName" -}}
{{- printf "%s-shared" (include "tandem.fullname" .) -}}
{{- end -}}

{{- define "tandem.clusterTokenSecretName" -}}
{{- default (printf "%s-cluster-token" (include "tandem.fullname" .)) .Values.clusterToken.existingSecret -}}
{{- end -}}

{{- define "tandem.clusterTokenPath" -}}/etc/tandem/cluster-token/token{{- end -}}

{{- define "tandem.etcdName" -}}
{{- printf "%s-etcd" (include "tandem.fullname" .) -}}
{{- end -}}

{{/* The etcd endpoints every process gets (--etcd): the bundled client Service, or the list given. */}}
{{- define "tandem.etcdEndpoints" -}}
{{- if eq .Values.etcd.mode "bundled" -}}
{{- printf "%s.%s.svc:%d" (include "tandem.etcdName" .) .Release.Namespace (int .Values.etcd.bundled.clientPort) -}}
{{- else -}}
{{- join "," .Values.etcd.endpoints -}}
{{- end -}}
{{- end -}}

{{/*
Resolve the pools of both roles into $out.prefill and $out.decode (lists of dicts), called as
  include "tandem.resolvePools" (dict "root" $ "out" $out)
Each pool: the role's settings, then the pool's keys on top (a key replaces the role's value
whole), and `engine` merged key by key: .Values.engine < role.engine < pool.engine. Also sets
role, name (the Deployment's) and device.
*/}}
{{- define "tandem.resolvePools" -}}
{{- $root := .root -}}
{{- range $role := list "prefill" "decode" -}}
{{- $settings := index $root.Values $role -}}
{{- $pools := list -}}
{{- range $pool := $settings.pools -}}
{{- $p := omit (deepCopy $settings) "pools" "engine" -}}
{{- range $k, $v := $pool -}}
{{- if ne $k "engine" -}}{{- $_ := set $p $k $v -}}{{- end -}}
{{- end -}}
{{- $engine := deepCopy $root.Values.engine -}}
{{- range $k, $v := ($settings.engine | default dict) -}}{{- $_ := set $engine $k $v -}}{{- end -}}
{{- range $k, $v := ($pool.engine | default dict) -}}{{- $_ := set $engine $k $v -}}{{- end -}}
{{- $_ := set $p "engine" $engine -}}
{{- $_ := set $p "role" $role -}}
{{- $_ := set $p "pool" $pool.name -}}
{{- $_ := set $p "name" (printf "%s-%s-%s" (include "tandem.fullname" $root) $role $pool.name) -}}
{{- $_ := set $p "device" (ternary "cuda" "cpu" (gt (int $p.gpus) 0)) -}}
{{- $pools = append $pools $p -}}
{{- end -}}
{{- $_ := set $.out $role $pools -}}
{{- end -}}
{{- end -}}

{{/* Flags a worker's command line gets from the chart; extraArgs may not set them again. */}}
{{- define "tandem.workerManagedFlags" -}}
--model --dtype --block-size --kv-transfer-backend --load-format --seed --device --host --port --metrics-port --metrics-host --advertise-host --etcd --etcd-prefix --member-ttl --cluster-token-file --log-level --attention-backend --enforce-eager --max-model-len --gpu-memory-utilization --max-num-seqs --max-num-batched-tokens --num-pages --num-gpu-blocks-override
{{- end -}}

{{- define "tandem.routerManagedFlags" -}}
--model --served-model-name --host --port --log-level --api-key --etcd --etcd-prefix --cluster-token-file --placement --max-model-len --request-timeout --max-queued-requests --queue-timeout --migration-limit --max-request-bytes --decode --prefill
{{- end -}}

{{/*
Append "--flag=value" to the list in .args.l unless the value is null:
  include "tandem.optFlag" (dict "args" $args "flag" "--x" "value" v "int" true)
int: print as an integer (Helm keeps numbers as float64, and 1048576 must not become 1.048576e+06).
*/}}
{{- define "tandem.optFlag" -}}
{{- if not (kindIs "invalid" .value) -}}
{{- $text := ternary (printf "%s=%d" .flag (int64 .value)) (printf "%s=%v" .flag .value) (default false .int) -}}
{{- $_ := set .args "l" (append .args.l $text) -}}
{{- end -}}
{{- end -}}

{{/* Environment of every Tandem container: the shared ConfigMap, the pod's own address. */}}
{{- define "tandem.commonEnv" -}}
envFrom:
  - configMapRef:
      name: {{ include "tandem.sharedConfigName" . }}
env:
  - name: POD_IP
    valueFrom:
      fieldRef:
        fieldPath: status.podIP
  - name: POD_NAME
    valueFrom:
      fieldRef:
        fieldPath: metadata.name
{{- if .Values.model.hfTokenSecret.name }}
  - name: HF_TOKEN
    valueFrom:
      secretKeyRef:
        name: {{ .Values.model.hfTokenSecret.name }}
        key: {{ .Values.model.hfTokenSecret.key }}
{{- end }}
{{- end -}}

{{/* Volume mounts and volumes of every Tandem container (cluster token, cache, /tmp, model). */}}
{{- define "tandem.commonMounts" -}}
- name: cluster-token
  mountPath: {{ dir (include "tandem.clusterTokenPath" .) }}
  readOnly: true
- name: cache
  mountPath: {{ .Values.model.cacheMountPath }}
- name: tmp
  mountPath: /tmp
{{- if .Values.model.volume }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "tandem.commonVolumes" -}}
- name: cluster-token
  secret:
    secretName: {{ include "tandem.clusterTokenSecretName" . }}
    defaultMode: 288   # 0440: the pod's group (fsGroup) reads it
    items:
      - key: {{ .Values.clusterToken.key }}
        path: {{ base (include "tandem.clusterTokenPath" .) }}
- name: cache
  {{- toYaml .Values.model.cacheVolume | nindent 2 }}
- name: tmp
  emptyDir: {}
{{- if .Values.model.volume }}
- name: model
  {{- toYaml .Values.model.volume | nindent 2 }}
{{- end }}
{{- end -}}

{{/* minAvailable when it is set (not null), else maxUnavailable (a count or a percentage). */}}
{{- define "tandem.pdbBudget" -}}
{{- if not (kindIs "invalid" .minAvailable) -}}
minAvailable: {{ .minAvailable }}
{{- else -}}
maxUnavailable: {{ .maxUnavailable | default 1 }}
{{- end -}}
{{- end -}}

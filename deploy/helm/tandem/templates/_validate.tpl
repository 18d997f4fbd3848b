{{/*
Template-time checks of what values.schema.json cannot express: settings that contradict
each other, across pools or across keys. Each `fail` message starts with "tandem:" and names
the values to change; deploy/helm/README.md lists them and tests/test_helm_chart.py triggers
each one. Called once, from templates/validate.yaml.
*/}}
{{- define "tandem.validate" -}}
{{- $v := .Values -}}
{{- $out := dict -}}
{{- include "tandem.resolvePools" (dict "root" . "out" $out) -}}
{{- $pools := concat $out.prefill $out.decode -}}

{{- /* 1. Pools that exchange KV must agree on what the KV is and how it travels. */ -}}
{{- if $pools -}}
{{- $first := first $out.decode | default (first $pools) -}}
{{- range $key := list "model" "dtype" "blockSize" "kvTransferBackend" "loadFormat" -}}
{{- $want := index $first.engine $key -}}
{{- range $p := $pools -}}
{{- if ne (toString (index $p.engine $key)) (toString $want) -}}
{{- fail (printf "tandem: engine.%s differs between pools: %s pool %q has %v, %s pool %q has %v; prefill and decode pools exchange KV and must agree (set it once in engine.%s)" $key $first.role $first.pool $want $p.role $p.pool (index $p.engine $key) $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* dummy weights are drawn from the seed: two seeds are two different models */ -}}
{{- if eq (toString $first.engine.loadFormat) "dummy" -}}
{{- range $p := $pools -}}
{{- if ne (toString $p.engine.seed) (toString $first.engine.seed) -}}
{{- fail (printf "tandem: engine.loadFormat is dummy and engine.seed differs (%s pool %q: %v, %s pool %q: %v): dummy weights come from the seed, so the pools would run different models" $first.role $first.pool $first.engine.seed $p.role $p.pool $p.engine.seed) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- /* 2. Membership: one source of etcd endpoints. */ -}}
{{- if and (eq $v.etcd.mode "external") (not $v.etcd.endpoints) -}}
{{- fail "tandem: etcd.mode is external but etcd.endpoints is empty; list your etcd's host:port endpoints, or use etcd.mode=bundled" -}}
{{- end -}}
{{- if and (eq $v.etcd.mode "bundled") $v.etcd.endpoints -}}
{{- fail (printf "tandem: etcd.endpoints is set (%s) but etcd.mode is bundled, which runs its own etcd; set etcd.mode=external to use those endpoints, or drop them" (join "," $v.etcd.endpoints)) -}}
{{- end -}}

{{- /* 3. Per pool. */ -}}
{{- $flags := splitList " " (include "tandem.workerManagedFlags" .) -}}
{{- range $role := list "prefill" "decode" -}}
{{- $seen := dict -}}
{{- range $p := index $out $role -}}
{{- if hasKey $seen $p.pool -}}
{{- fail (printf "tandem: %s.pools has two pools named %q; pool names name Deployments and must be unique within a role" $role $p.pool) -}}
{{- end -}}
{{- $_ := set $seen $p.pool true -}}
{{- if gt (len $p.name) 63 -}}
{{- fail (printf "tandem: the %s pool %q would be named %q (%d characters; Kubernetes allows 63 in a label); shorten the pool name, the release name or fullnameOverride" $role $p.pool $p.name (len $p.name)) -}}
{{- end -}}
{{- if and $p.pdb.enabled (kindIs "float64" $p.pdb.minAvailable) (ge (int $p.pdb.minAvailable) (int $p.replicas)) (gt (int $p.replicas) 0) -}}
{{- fail (printf "tandem: %s pool %q has pdb.minAvailable %d with %d replicas: no pod could ever be evicted and node drains would hang; use pdb.maxUnavailable or a smaller minAvailable" $role $p.pool (int $p.pdb.minAvailable) (int $p.replicas)) -}}
{{- end -}}
{{- if $p.hugepages.enabled -}}
{{- $res := $p.resources | default dict -}}
{{- $cpuOrMemory := false -}}
{{- range $part := list ($res.requests | default dict) ($res.limits | default dict) -}}
{{- if or (hasKey $part "cpu") (hasKey $part "memory") -}}{{- $cpuOrMemory = true -}}{{- end -}}
{{- end -}}
{{- if not $cpuOrMemory -}}
{{- fail (printf "tandem: %s pool %q requests hugepages but its resources give no cpu or memory; Kubernetes refuses such a pod (hugepages require a cpu or memory request)" $role $p.pool) -}}
{{- end -}}
{{- end -}}
{{- if and (eq (toString $p.engine.attentionBackend) "triton") (eq $p.device "cpu") -}}
{{- fail (printf "tandem: %s pool %q has engine.attentionBackend triton but gpus 0 (--device cpu); the Triton kernels need a GPU (use auto or torch, or gpus 1)" $role $p.pool) -}}
{{- end -}}
{{- range $arg := $p.extraArgs -}}
{{- $name := first (splitList "=" (toString $arg)) -}}
{{- if and (hasPrefix "--" $name) (gt (len $name) 2) -}}
{{- range $f := $flags -}}
{{- if hasPrefix $name $f -}}
{{- fail (printf "tandem: %s pool %q: extraArgs %q sets %s, which the chart sets from its values (argparse would take the last one and bypass the chart's checks); use the matching value instead" $role $p.pool (toString $arg) $f) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $r := index $v $role -}}
{{- if eq (int $r.port) (int $r.metricsPort) -}}
{{- fail (printf "tandem: %s.port and %s.metricsPort are both %d; gRPC and /metrics need their own ports" $role $role (int $r.port)) -}}
{{- end -}}
{{- end -}}

{{- /* 5. One GPU shared under the device plugin's MPS: every worker on it, each share under the plugin's cap. */ -}}
{{- $single := $v.singleGpu -}}
{{- if $single.enabled -}}
{{- $pods := 0 -}}
{{- range $p := $pools -}}
{{- if ne (int $p.gpus) 1 -}}
{{- fail (printf "tandem: singleGpu.enabled needs gpus 1 on every pool, but the %s pool %q has gpus %d; each worker takes one MPS replica of the shared GPU" $p.role $p.pool (int $p.gpus)) -}}
{{- end -}}
{{- $pods = add $pods (int $p.replicas) -}}
{{- end -}}
{{- $replicas := int $single.mpsReplicas -}}
{{- if gt (int $pods) $replicas -}}
{{- fail (printf "tandem: singleGpu.enabled with %d worker pods but singleGpu.mpsReplicas %d; each pod takes one replica of the device plugin's MPS-shared GPU (raise sharing.mps replicas there and singleGpu.mpsReplicas here, or run fewer pods)" (int $pods) $replicas) -}}
{{- end -}}
{{- $pp := int (round (mulf 100.0 (float64 $single.prefillSmFraction)) 0) -}}
{{- $cap := div 100 $replicas -}}
{{- range $share := list (list "prefill" $pp) (list "decode" (sub 100 $pp)) -}}
{{- if gt (int (index $share 1)) (int $cap) -}}
{{- fail (printf "tandem: singleGpu.prefillSmFraction %v gives %s %d%% of the SMs, above the %d%% the device plugin's MPS allows each of its %d replicas (a client can only lower its limit); use a fraction whose shares both fit under %d%%, or fewer replicas" $single.prefillSmFraction (index $share 0) (int (index $share 1)) (int $cap) $replicas (int $cap)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- /* 4. Router. */ -}}
{{- $rflags := splitList " " (include "tandem.routerManagedFlags" .) -}}
{{- range $arg := $v.router.extraArgs -}}
{{- $name := first (splitList "=" (toString $arg)) -}}
{{- if and (hasPrefix "--" $name) (gt (len $name) 2) -}}
{{- range $f := $rflags -}}
{{- if hasPrefix $name $f -}}
{{- fail (printf "tandem: router.extraArgs %q sets %s, which the chart sets from its values; use the matching value instead" (toString $arg) $f) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and $v.router.pdb.enabled (kindIs "float64" $v.router.pdb.minAvailable) (ge (int $v.router.pdb.minAvailable) (int $v.router.replicas)) -}}
{{- fail (printf "tandem: router.pdb.minAvailable %d with %d router replicas: no router pod could ever be evicted and node drains would hang; use router.pdb.maxUnavailable or more replicas" (int $v.router.pdb.minAvailable) (int $v.router.replicas)) -}}
{{- end -}}
{{- end -}}

{{/* Chart name. */}}
{{- define "agent-authz.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: release-chart, unless overridden or the release already contains the chart name. */}}
{{- define "agent-authz.fullname" -}}
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

{{- define "agent-authz.webhookName" -}}
{{- printf "%s-webhook" (include "agent-authz.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "agent-authz.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "agent-authz.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "agent-authz.webhookSelector" -}}
app.kubernetes.io/name: {{ include "agent-authz.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: webhook
{{- end -}}

{{/* The image reference: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "agent-authz.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "agent-authz.tlsSecret" -}}
{{- if eq .Values.webhook.tls.mode "secret" -}}
{{- .Values.webhook.tls.existingSecret -}}
{{- else -}}
{{- printf "%s-tls" (include "agent-authz.webhookName" .) -}}
{{- end -}}
{{- end -}}

{{- define "agent-authz.sidecarConfigMap" -}}
{{- printf "%s-sidecar" (include "agent-authz.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "agent-authz.signingKeySecret" -}}
{{- default (printf "%s-signing-key" (include "agent-authz.fullname" .) | trunc 63 | trimSuffix "-") .Values.signingKey.existingSecret -}}
{{- end -}}

{{/* The cluster authority: rendered when enabled and there are agent namespaces to serve. */}}
{{- define "agent-authz.authorityEnabled" -}}
{{- if and .Values.authority.enabled .Values.agentNamespaces -}}true{{- end -}}
{{- end -}}

{{- define "agent-authz.authorityName" -}}
{{- printf "%s-authority" (include "agent-authz.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "agent-authz.authoritySelector" -}}
app.kubernetes.io/name: {{ include "agent-authz.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: authority
{{- end -}}

{{- define "agent-authz.revocationsConfigMap" -}}
{{- printf "%s-revocations" (include "agent-authz.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "agent-authz.keysConfigMap" -}}
{{- printf "%s-keys" (include "agent-authz.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "agent-authz.authorityTlsSecret" -}}
{{- if eq .Values.authority.tls.mode "secret" -}}
{{- .Values.authority.tls.existingSecret -}}
{{- else -}}
{{- printf "%s-tls" (include "agent-authz.authorityName" .) -}}
{{- end -}}
{{- end -}}

{{/* The authority Service's in-cluster DNS name. */}}
{{- define "agent-authz.authorityHost" -}}
{{- printf "%s.%s.svc" (include "agent-authz.authorityName" .) .Release.Namespace -}}
{{- end -}}

{{/* Base of the issuer URLs: namespace N's tokens carry iss <base>/ns/N. */}}
{{- define "agent-authz.issuerBaseUrl" -}}
{{- default (printf "https://%s" (include "agent-authz.authorityHost" .)) .Values.authority.issuerBaseUrl | trimSuffix "/" -}}
{{- end -}}

{{/*
The authority's serving certificate, computed once per render (generate: read back from the
Secret on upgrade, else genCA/genSignedCert) and kept in .Values.authority.__tls, so the Secret and
every agent namespace's authority-ca.pem agree whichever template renders first.
*/}}
{{- define "agent-authz.authorityTls" -}}
{{- if not (hasKey .Values.authority "__tls") -}}
{{- $name := include "agent-authz.authorityName" . -}}
{{- $ns := .Release.Namespace -}}
{{- $material := dict "ca" "" "crt" "" "key" "" -}}
{{- if eq .Values.authority.tls.mode "generate" -}}
{{- $existing := lookup "v1" "Secret" $ns (include "agent-authz.authorityTlsSecret" .) -}}
{{- if and $existing $existing.data (hasKey $existing.data "ca.crt") (hasKey $existing.data "tls.crt") (hasKey $existing.data "tls.key") -}}
{{- $_ := set $material "ca" (index $existing.data "ca.crt") -}}
{{- $_ := set $material "crt" (index $existing.data "tls.crt") -}}
{{- $_ := set $material "key" (index $existing.data "tls.key") -}}
{{- else -}}
{{- $dnsNames := list $name (printf "%s.%s" $name $ns) (printf "%s.%s.svc" $name $ns) (printf "%s.%s.svc.cluster.local" $name $ns) -}}
{{- $ca := genCA (printf "%s-ca" $name) (int .Values.authority.tls.validityDays) -}}
{{- $cert := genSignedCert (printf "%s.%s.svc" $name $ns) nil $dnsNames (int .Values.authority.tls.validityDays) $ca -}}
{{- $_ := set $material "ca" ($ca.Cert | b64enc) -}}
{{- $_ := set $material "crt" ($cert.Cert | b64enc) -}}
{{- $_ := set $material "key" ($cert.Key | b64enc) -}}
{{- end -}}
{{- else -}}
{{- $_ := set $material "ca" .Values.authority.tls.caBundle -}}
{{- end -}}
{{- $_ := set .Values.authority "__tls" $material -}}
{{- end -}}
{{- end -}}

{{/*
sidecar.yaml of every injected pod, for one namespace (dict "root" $ "namespace" NS; the webhook's
copy is rendered for "{namespace}": only issuer.url differs between namespaces). The paths are the
pod layout of sidecar/inject/layout.py; the webhook refuses to start when they disagree.
*/}}
{{- define "agent-authz.sidecarConfig" -}}
{{- $namespace := .namespace -}}
{{- with .root -}}
{{- $s := .Values.sidecar -}}
{{- $log := dict "stdout" $s.decisionLog.stdout "fsync" $s.decisionLog.fsync -}}
{{- if $s.decisionLog.file -}}
{{- $_ := set $log "path" "/var/log/agent-authz/decisions.log" -}}
{{- $_ := set $log "rotate" (dict "max_bytes" $s.decisionLog.rotateMaxBytes "keep" $s.decisionLog.rotateKeep) -}}
{{- end -}}
{{- $config := dict
  "identity" (dict "source" "workload_api" "workload_api" (dict "socket" (printf "unix:///spiffe-workload-api/%s" .Values.identity.workloadApi.socketName)))
  "issuer" (dict "url" (ternary (printf "%s/ns/%s" (include "agent-authz.issuerBaseUrl" .) $namespace) $s.issuerUrl (eq (include "agent-authz.authorityEnabled" .) "true")) "signing_key" "/etc/agent-authz/keys/signing.pem" "max_token_ttl" $s.maxTokenTtl)
  "listen" (dict "authz" "unix:/run/agent-authz/ctl/authz.sock" "admin" (printf "127.0.0.1:%d" (int $s.adminPort)) "health" (printf "0.0.0.0:%d" (int $s.healthPort)))
  "envoy" (dict
    "egress_port" (int $s.egressPort)
    "admin_socket" "/run/agent-authz/ctl/envoy-admin.sock"
    "outbound_port" (int .Values.interception.outboundPort)
    "ingress_port" (int .Values.interception.inboundPort)
    "inbound_redirect" .Values.interception.inbound
    "ipv6" (eq .Values.interception.ipv6 "same")
    "authz_timeout" $s.authzTimeout)
  "decision_log" $log
  "state" (dict "path" "/var/lib/agent-authz/state/state.db" "synchronous" $s.state.synchronous)
  "task_files" (list (dict "path" "/etc/agent-authz/pod/task" "revoked" "/etc/agent-authz/pod/revoked"))
  "dry_run" $s.dryRun
-}}
{{- if $s.credentials -}}
{{- $credentials := dict -}}
{{- range $name, $c := $s.credentials -}}
{{- $_ := set $credentials $name (dict "header" $c.header "file" (printf "/etc/agent-authz/credentials/%s/%s" $name $c.key) "prefix" (default "" $c.prefix)) -}}
{{- end -}}
{{- $_ := set $config "credentials" $credentials -}}
{{- end -}}
{{- $dnsAllow := list (printf "*.%s" .Values.dns.clusterDomain) -}}
{{- range .Values.dns.allow -}}
{{- $dnsAllow = append $dnsAllow . -}}
{{- end -}}
{{- $_ := set $config "dns" (dict "listen" (printf "127.0.0.1:%d" (int .Values.dns.port)) "allow" $dnsAllow "refuse_with" .Values.dns.refuseWith) -}}
{{- if $s.intercept.enabled -}}
{{- $_ := set $config "intercept" (dict "state_dir" "/run/agent-authz/intercept" "publish_dir" "/etc/agent-authz/trust" "ca_ttl" $s.intercept.caTtl "leaf_ttl" $s.intercept.leafTtl) -}}
{{- end -}}
{{- if eq (include "agent-authz.authorityEnabled" .) "true" -}}
{{- $feed := dict
  "url" (printf "https://%s:%d" (include "agent-authz.authorityHost" .) (int .Values.authority.feedPort))
  "ca" "/etc/agent-authz/config/authority-ca.pem"
  "max_staleness" $s.revocationFeed.maxStaleness
  "stale_applies_to" $s.revocationFeed.staleAppliesTo
-}}
{{- $_ := set $config "grants" (dict "revocation_feed" $feed) -}}
{{- end -}}
{{- if $s.rootIssuers -}}
{{- $grants := default (dict) (get $config "grants") -}}
{{- $_ := set $grants "root_issuers" (list (dict "jwks" "/etc/agent-authz/config/root-issuers.jwks.json")) -}}
{{- $_ := set $config "grants" $grants -}}
{{- end -}}
{{- toYaml (mergeOverwrite $config (deepCopy $s.extraConfig)) -}}
{{- end -}}
{{- end -}}

{{/* injector.yaml: the webhook's settings (sidecar/inject/settings.py). */}}
{{- define "agent-authz.injectorSettings" -}}
{{- $settings := dict
  "image" (include "agent-authz.image" .)
  "image_pull_policy" .Values.image.pullPolicy
  "proxy_uid" (int .Values.proxy.uid)
  "proxy_gid" (int .Values.proxy.gid)
  "sidecar_config" "sidecar.yaml"
  "config_map" (include "agent-authz.sidecarConfigMap" .)
  "signing_key_secret" (include "agent-authz.signingKeySecret" .)
  "namespaces" .Values.agentNamespaces
  "trust_domain" .Values.identity.trustDomain
  "spiffe_id_template" .Values.identity.spiffeIdTemplate
  "workload_api" (dict "mode" .Values.identity.workloadApi.mode "driver" .Values.identity.workloadApi.csiDriver "host_path" .Values.identity.workloadApi.hostPath)
  "exclude_inbound_ports" .Values.interception.excludeInboundPorts
  "exclude_outbound_cidrs" .Values.interception.excludeOutboundCIDRs
  "exclude_outbound_ports" .Values.interception.excludeOutboundPorts
  "allow_non_tcp" .Values.interception.allowNonTcp
  "allow_opt_out" .Values.injection.allowOptOut
  "require_run_as_user" .Values.injection.requireRunAsUser
  "harden_containers" .Values.injection.hardenContainers
  "logs_size_limit" .Values.sidecar.decisionLog.sizeLimit
  "state_size_limit" .Values.sidecar.state.sizeLimit
  "init" (dict "resources" .Values.init.resources)
  "sidecar" (dict "resources" .Values.sidecar.resources "log_level" .Values.sidecar.logLevel)
  "envoy" (dict "resources" .Values.envoy.resources "concurrency" (int .Values.envoy.concurrency) "log_level" .Values.envoy.logLevel)
  "task_authors" (dict "users" .Values.injection.taskAuthors.users "groups" .Values.injection.taskAuthors.groups "service_accounts" .Values.injection.taskAuthors.serviceAccounts)
-}}
{{- $trust := dict "bundle" "/etc/agent-authz-webhook/trust/bundle.pem" -}}
{{- if .Values.authority.rootIssuers.configMap -}}
{{- $_ := set $trust "root_issuers" "/etc/agent-authz-webhook/root-issuers/issuers.jwks.json" -}}
{{- else if .Values.sidecar.rootIssuers -}}
{{- $_ := set $trust "root_issuers" "root-issuers.jwks.json" -}}
{{- end -}}
{{- $_ := set $settings "grant_trust" $trust -}}
{{- $credentials := list -}}
{{- range $name, $c := .Values.sidecar.credentials -}}
{{- $credentials = append $credentials (dict "name" $name "secret_name" $c.secretName "key" $c.key) -}}
{{- end -}}
{{- $_ := set $settings "credentials" $credentials -}}
{{- toYaml $settings -}}
{{- end -}}

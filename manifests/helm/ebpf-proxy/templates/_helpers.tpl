{{- define "ebpf-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ebpf-proxy.fullname" -}}
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

{{- define "ebpf-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ebpf-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ebpf-proxy.labels" -}}
{{ include "ebpf-proxy.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The API server's own address for --api-server (ConfigMap key api-server): apiServer.host
is required; "auto" reads the server of kube-public/cluster-info's kubeconfig (kubeadm
publishes it there), as Cilium's k8sServiceHost=auto does.
*/}}
{{- define "ebpf-proxy.apiServer" -}}
{{- $host := default "" .Values.apiServer.host | toString | trim -}}
{{- if eq $host "auto" -}}
{{- $server := "" -}}
{{- $ci := lookup "v1" "ConfigMap" "kube-public" "cluster-info" -}}
{{- if and $ci $ci.data -}}
{{- $kc := fromYaml (get $ci.data "kubeconfig") -}}
{{- range ($kc.clusters | default list) -}}
{{- if and (not $server) .cluster -}}
{{- $server = .cluster.server | default "" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- required "apiServer.host=auto found no server in kube-public/cluster-info (not a kubeadm cluster, or rendered without a cluster, e.g. helm template): set apiServer.host to the API server's address" $server -}}
{{- else -}}
{{- $host = required "apiServer.host is required: without kube-proxy the agent must reach the API server at its own address (--set apiServer.host=<control-plane address>), or set it to auto on a kubeadm cluster" (ternary "" $host (eq $host "")) -}}
{{- $colons := sub (len (splitList ":" $host)) 1 -}}
{{- if or (contains "://" $host) (contains "]:" $host) (eq $colons 1) -}}
{{- /* A URL, [IPv6]:PORT or HOST:PORT: complete already. */ -}}
{{- ternary $host (printf "https://%s" $host) (contains "://" $host) -}}
{{- else if gt $colons 1 -}}
{{- printf "https://[%s]:%v" (trimAll "[]" $host) .Values.apiServer.port -}}
{{- else -}}
{{- printf "https://%s:%v" (trimAll "[]" $host) .Values.apiServer.port -}}
{{- end -}}
{{- end -}}
{{- end }}

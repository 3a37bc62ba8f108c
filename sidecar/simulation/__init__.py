"""A simulated cluster on one host: what no CI machine (and no demo machine) has, played for real.

No Kubernetes API server, kubelet, container runtime or SPIRE agent runs here, so these modules do
their part with the real protocols and the real pieces: network namespaces with veth pairs and a
bridge (:mod:`~sidecar.simulation.netns`), a kubelet that runs an admitted pod's containers in their
own mount and PID namespaces with their UIDs and capabilities (:mod:`~sidecar.simulation.kubelet`,
:mod:`~sidecar.simulation.container_exec`), a Kubernetes API server double speaking the REST
protocol over HTTPS, calling admission webhooks and running Jobs (:mod:`~sidecar.simulation.kube_api`),
and a SPIFFE Workload API server with Envoy's SDS (:mod:`~sidecar.simulation.workload_api`). The
tests and ``agent-authz demo --scenario cluster`` use them; they need root (namespaces, mounts,
iptables), except the API double.
"""

"""Sidecar injection: the ``agent-authz webhook`` mutating admission webhook (Kubernetes
``admission.k8s.io/v1``) that adds the iptables init step, the authz sidecar and Envoy to agent pods.

Modules: :mod:`~sidecar.inject.layout` (where things live inside an injected pod),
:mod:`~sidecar.inject.settings` (the injector's settings file), :mod:`~sidecar.inject.annotations`
(the pod annotations and their validation), :mod:`~sidecar.inject.podspec` (reading the untrusted
pod; the outcome values), :mod:`~sidecar.inject.containers` (container-level: the checks on the
pod's own containers and the three injected ones), :mod:`~sidecar.inject.pod` (pod-level: the
pure patch builder for ``CREATE`` and ``UPDATE``), :mod:`~sidecar.inject.review` (AdmissionReview
in, AdmissionReview out), :mod:`~sidecar.inject.server` (the aiohttp HTTPS server),
:mod:`~sidecar.inject.check` (the client the chart's ``helm test`` runs).
"""

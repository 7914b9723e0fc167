{{/*
The operator's rules on what lives in namespaces: in its ClusterRole when it watches every namespace
(or namespaces by pattern), else in a Role in each watched namespace (operator-namespace-rbac.yaml).
*/}}
{{- define "lorafleet.operatorNamespacedRules" -}}
  # Its own resources: watch, add and remove its finalizers, and write status (a LoRATenant's status.keys:
  # the API key digests the gateway accepts).
  - apiGroups: ["lorafleet.io"]
    resources: ["basemodelpools", "loraadapters"]
    verbs: ["get", "list", "watch", "patch", "update"]
  - apiGroups: ["lorafleet.io"]
    resources: ["basemodelpools/status", "loraadapters/status", "loratenants/status"]
    verbs: ["get", "patch", "update"]
  # Objects a pool owns carry blockOwnerDeletion: clusters with the OwnerReferencesPermissionEnforcement
  # admission plugin require update on the owner's finalizers subresource to set it.
  - apiGroups: ["lorafleet.io"]
    resources: ["basemodelpools/finalizers"]
    verbs: ["update"]
  # kopf posts events on the objects it handles (what `kubectl describe` shows).
  - apiGroups: ["", "events.k8s.io"]
    resources: ["events"]
    verbs: ["create", "patch"]
  # Per pool: the pod Deployment, its Service and Ingress, the routes ConfigMaps (applied
  # server-side, so create and patch; delete for shards and ingresses that go away).
  - apiGroups: ["apps"]
    resources: ["deployments"]
    verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
  - apiGroups: [""]
    resources: ["services", "configmaps", "serviceaccounts"]
    verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
  # With a gateway, a NetworkPolicy lets only the pool's gateway pods reach the runtime port.
  - apiGroups: ["networking.k8s.io"]
    resources: ["ingresses", "networkpolicies"]
    verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
  # Per pool with spec.httpRoute, its HTTPRoute (Gateway API; watched once the CRDs are there). Only
  # routes: Gateways and GatewayClasses are the cluster admin's.
  - apiGroups: ["gateway.networking.k8s.io"]
    resources: ["httproutes"]
    verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
  # Per pool, a PodDisruptionBudget over its pods (spec.disruption).
  - apiGroups: ["policy"]
    resources: ["poddisruptionbudgets"]
    verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
  # Per pool, the sidecar's and the gateway's Role and RoleBinding. Without `bind` or `escalate` the
  # API server lets the operator grant only what it holds itself: configmaps get/list/watch (the
  # sidecar's routes, by name), pods get/list/watch and lorafleet resources get/list/watch (the
  # gateway's reads). No rule here reads or writes Secrets, directly or through a role it may bind.
  - apiGroups: ["rbac.authorization.k8s.io"]
    resources: ["roles", "rolebindings"]
    verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
  # The one ClusterRole the operator may bind (in a pool's namespace, to the pool's sidecar): a
  # sidecar patches its own pod's sync annotation (the pool-sidecar ValidatingAdmissionPolicy holds it
  # to that), which the operator itself may not.
  - apiGroups: ["rbac.authorization.k8s.io"]
    resources: ["clusterroles"]
    verbs: ["bind"]
    resourceNames: [{{ printf "%s-pool-sidecar" (include "lorafleet.fullname" .) | quote }}]
  # Pool and gateway pods: readiness and the sync annotation (lorafleet.io/sync) the sidecars write.
  - apiGroups: [""]
    resources: ["pods"]
    verbs: ["get", "list", "watch"]
  # Tenants: where their adapters may come from (spec.sources), checked before an adapter is routed.
  - apiGroups: ["lorafleet.io"]
    resources: ["loratenants"]
    verbs: ["get", "list", "watch"]
{{- end }}

{{/*
What the operator needs cluster-wide in any case: kopf scans the cluster's CRDs (an HTTPRoute watch
starts once the Gateway API's CRDs exist) and follows the namespaces it watches (created, deleted).
(The operator runs kopf standalone, so kopf's peering resources are not needed.)
*/}}
{{- define "lorafleet.operatorClusterRules" -}}
  - apiGroups: ["apiextensions.k8s.io"]
    resources: ["customresourcedefinitions"]
    verbs: ["get", "list", "watch"]
  - apiGroups: [""]
    resources: ["namespaces"]
    verbs: ["get", "list", "watch"]
{{- end }}

"""build_app's deployment options: CPU-only deployments ask for `cpu_node_resource` only when the
operator names one (the clusters' CPU node types offer it; a single node does not)."""

from typing import Any

from ray.serve import Application

from serve_app.app import CPU_NODE_SHARE, build_app

ARGS = {"models": ["tiny-sd"], "storage": "/tmp/artserve-test-app-images"}


def deployments(app: Application) -> dict[str, dict[str, Any]]:
    """Each bound deployment's ray_actor_options, by name: the ingress and what it was bound with."""
    ingress = app._bound_deployment
    found = {ingress.name: ingress.ray_actor_options}
    for arg in ingress.init_args:
        if isinstance(arg, Application):
            found[arg._bound_deployment.name] = arg._bound_deployment.ray_actor_options
        elif isinstance(arg, dict):
            for handle in arg.values():
                if isinstance(handle, Application):
                    found[handle._bound_deployment.name] = handle._bound_deployment.ray_actor_options
    return found


def test_cpu_only_deployments_ask_for_the_cpu_node_resource_when_configured():
    options = deployments(build_app({**ARGS, "cpu_node_resource": "artserve_cpu_node"}))
    assert set(options) == {"ImageIngress", "IdempotencyStore", "ModelServer:tiny-sd"}
    for name in ("ImageIngress", "IdempotencyStore"):
        assert options[name]["resources"] == {"artserve_cpu_node": CPU_NODE_SHARE}, name
    assert options["ImageIngress"]["num_cpus"] == 0.25 and options["IdempotencyStore"]["num_cpus"] == 0
    assert "artserve_cpu_node" not in (options["ModelServer:tiny-sd"].get("resources") or {})  # models: their pools


def test_without_it_nothing_asks_for_a_custom_resource():
    options = deployments(build_app(ARGS))
    assert not any(o.get("resources") for o in options.values()), options


def test_an_operators_ingress_options_are_kept_beside_the_resource():
    ingress = {"ray_actor_options": {"num_cpus": 0.5, "resources": {"zone_a": 1}}, "max_ongoing_requests": 50}
    app = build_app({**ARGS, "cpu_node_resource": "artserve_cpu_node", "ingress": ingress})
    options = deployments(app)["ImageIngress"]
    assert options == {"num_cpus": 0.5, "resources": {"artserve_cpu_node": CPU_NODE_SHARE, "zone_a": 1}}
    assert app._bound_deployment._deployment_config.max_ongoing_requests == 50
    # An operator's own amount of it wins.
    ingress = {"ray_actor_options": {"resources": {"artserve_cpu_node": 0.5}}}
    app = build_app({**ARGS, "cpu_node_resource": "artserve_cpu_node", "ingress": ingress})
    assert deployments(app)["ImageIngress"]["resources"] == {"artserve_cpu_node": 0.5}

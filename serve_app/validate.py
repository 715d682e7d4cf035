"""Offline checks of what an operator deploys: a serve config (Serve's own schema, then each
application's args, model YAMLs and deployment options as `build_app` would see them) or a
model YAML. Nothing is imported from torch and no weights are loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from serve_app.config import AppConfig, ConfigError, check_deployment_options, explain, load_model_config
from serve_app.readiness import deployment_name

IMPORT_PATH = "serve_app.app:build_app"
INGRESS = "ImageIngress"


def validate_file(path: Path) -> str:
    """A one-line summary, or ValueError naming the file and the field."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if isinstance(data, dict) and "applications" in data:
        return validate_serve_config(data, path)
    model = load_model_config(path)
    return f"model {model.id} ({model.family}, {model.source})"


def validate_serve_config(data: dict[str, Any], path: Path, env: dict[str, str] | None = None) -> str:
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    # Serve's schema ignores unknown keys here (a misspelled `http_options` would be dropped).
    _known_keys(data, ServeDeploySchema, f"{path}")
    _known_keys(data.get("http_options") or {}, HTTPOptionsSchema, f"{path}: http_options")
    for index, app in enumerate(data.get("applications") or []):
        _known_keys(app, ServeApplicationSchema, f"{path}: applications[{index}]")
    try:
        schema = ServeDeploySchema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {explain(exc)}") from None
    summary = []
    for index, app in enumerate(schema.applications):
        where = f"{path}: applications[{index}] ({app.name})"
        if app.import_path != IMPORT_PATH:
            raise ConfigError(f"{where}.import_path: expected {IMPORT_PATH}, got {app.import_path}")
        raw = data["applications"][index]
        try:
            config = AppConfig.from_args(raw.get("args") or {}, env={} if env is None else env)
            models = config.load_models()
        except ConfigError as exc:
            raise ConfigError(f"{where}.args: {exc}") from None
        known = {INGRESS} | {deployment_name(model_id) for model_id in models}
        for position, deployment in enumerate(raw.get("deployments") or []):
            name = deployment.get("name")
            if name not in known:
                raise ConfigError(f"{where}.deployments[{position}].name: {name!r} is not one of {sorted(known)}")
            try:
                check_deployment_options({k: v for k, v in deployment.items() if k != "name"})
            except ValueError as exc:
                raise ConfigError(f"{where}.deployments[{position}] ({name}): {exc}") from None
        summary.append(f"{app.name}: {', '.join(models)}")
    return "; ".join(summary)


def _known_keys(data: dict[str, Any], schema, where: str) -> None:
    unknown = sorted(set(data) - set(schema.model_fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) (misspelled?): {', '.join(unknown)}")

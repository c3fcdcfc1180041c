"""The Model Registry client: registered models, versions, aliases, tags and descriptions, and
loading a registered (or logged) model. With tracking.py, the only importer of mlflow."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from reprolab.tags import MODEL_HASH


def load_classifier(
    model_uri: str, allow_pickle: bool = False
) -> tuple[Any, tuple[int, ...], list[str]]:
    """-> (model, input shape C x H x W, class names) of a logged or registered model.

    Only the pt2 format loads by default: a model in MLflow's pickle format runs code from the
    artifact when it loads, so whoever can write a registry version would run code here. MLflow
    itself allows pickle unless MLFLOW_ALLOW_PICKLE_DESERIALIZATION says false; reprolab sets it
    for the load, and `allow_pickle` (predict --allow-pickle) opts in for a trusted registry.
    """
    from reprolab.errors import DataError

    previous = os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = str(allow_pickle).lower()
    try:
        info = mlflow.models.get_model_info(model_uri)
        if "pytorch" not in info.flavors:
            raise DataError(f"--model {model_uri}: not a PyTorch model (flavors: "
                            f"{', '.join(info.flavors)}); reprolab serves its own pt2 models")
        model = mlflow.pytorch.load_model(model_uri)
    except MlflowException as exc:
        message = str(exc).splitlines()[0]
        if "pickle" in message.lower():
            raise DataError(
                f"--model {model_uri}: saved in MLflow's pickle format, whose loading runs code "
                "from the artifact; refused. Log it with serialization_format='pt2', or, for a "
                "registry you trust, pass --allow-pickle"
            ) from None
        raise DataError(f"--model {model_uri}: {message}") from None
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)
        else:
            os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = previous
    shape = tuple(info.signature.inputs.inputs[0].shape[1:])
    classes = (info.metadata or {}).get("classes") or []  # models logged without names
    return model, shape, classes


def ensure_registered_model(name: str, tags: dict[str, str]) -> dict[str, str]:
    """Create the registered model with `tags` unless it exists; -> its tags as stored."""
    client = MlflowClient()
    with contextlib.suppress(MlflowException):  # it exists, or another process created it first
        client.create_registered_model(name, tags=tags)
    return dict(client.get_registered_model(name).tags)


def register_version(name: str, model_uri: str, run_id: str, tags: dict[str, str]) -> str:
    """Register a model once: a second call for the same model file (its sha256 in `tags`)
    returns the version that has it, whichever run trained it.

    `model_uri` is the logged model's `models:/m-...` URI. A REST server refuses it as a version
    source unless the call names the logged model too (`model_id`), as mlflow.register_model does.
    """
    client = MlflowClient()
    digest = tags[MODEL_HASH]
    same = f"name = '{name}' and tags.`{MODEL_HASH}` = '{digest}'"
    for version in client.search_model_versions(same):
        return str(version.version)
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = client.create_model_version(
        name, model_uri, run_id=run_id, tags=tags, model_id=model_id
    )
    return str(version.version)


def model_versions(name: str) -> list[dict[str, Any]]:
    """-> every version of `name` as {version, run_id, tags}, in version order (all pages)."""
    client, token, out = MlflowClient(), None, []
    while True:
        page = client.search_model_versions(f"name = '{name}'", max_results=1000,
                                            page_token=token)
        out += [{"version": str(v.version), "run_id": v.run_id, "tags": dict(v.tags),
                 "description": v.description or ""} for v in page]
        token = page.token
        if not token:
            return sorted(out, key=lambda v: int(v["version"]))


def registered_version(model_uri: str) -> dict[str, Any]:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> {name, version, run_id, tags}."""
    from reprolab.errors import DataError

    ref = model_uri.removeprefix("models:/")
    name, at, alias = ref.partition("@")
    if not model_uri.startswith("models:/") or not (at or "/" in ref):
        raise DataError(f"{model_uri}: not a registry URI; use models:/NAME@ALIAS or "
                        "models:/NAME/VERSION")
    client = MlflowClient()
    try:
        if at:
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = ref.rpartition("/")
            version = client.get_model_version(name, number)
    except MlflowException as exc:
        raise DataError(f"{model_uri}: {str(exc).splitlines()[0]}") from None
    return {"name": name, "version": str(version.version), "run_id": version.run_id,
            "tags": dict(version.tags)}


def set_alias(name: str, alias: str, version: str | None) -> bool:
    """Point `alias` at `version`; None removes the alias. -> False when the version is gone
    (another process deleted its duplicate meanwhile)."""
    client = MlflowClient()
    if version is None:
        with contextlib.suppress(MlflowException):  # no such alias: nothing to remove
            client.delete_registered_model_alias(name, alias)
        return True
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException:
        if any(v["version"] == version for v in model_versions(name)):
            raise
        return False
    return True


def delete_version(name: str, version: str) -> None:
    MlflowClient().delete_model_version(name, version)


def set_registered_model_tags(name: str, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_registered_model_tag(name, key, value)


def set_version_tag(name: str, version: str, key: str, value: str) -> None:
    MlflowClient().set_model_version_tag(name, version, key, value)


def set_description(name: str, version: str, text: str) -> bool:
    """-> False when the version is gone (another process deleted its duplicate meanwhile)."""
    try:
        MlflowClient().update_model_version(name, version, description=text)
    except MlflowException:
        if any(v["version"] == version for v in model_versions(name)):
            raise
        return False
    return True


def registered_model_tags(name: str) -> dict[str, str]:
    from reprolab.errors import DataError

    try:
        return dict(MlflowClient().get_registered_model(name).tags)
    except MlflowException as exc:
        raise DataError(f"registered model {name!r}: {str(exc).splitlines()[0]}") from None

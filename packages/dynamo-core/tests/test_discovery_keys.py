"""The discovery key layout: byte for byte what processes of every version in a graph expect."""

from __future__ import annotations

from dynamo_core.llm.model_card import MODELS_PREFIX
from dynamo_core.llm.model_card import model_key as card_key
from dynamo_core.runtime.discovery import keys


def test_instance_keys_and_prefixes() -> None:
    assert keys.instances_prefix() == "v1/instances/"
    assert keys.instances_prefix("demo") == "v1/instances/demo/"
    assert keys.instances_prefix("demo", "backend") == "v1/instances/demo/backend/"
    assert keys.instances_prefix("demo", "backend", "generate") == (
        "v1/instances/demo/backend/generate/"
    )
    key = keys.instance_key("demo", "backend", "generate", 0xABC)
    assert key == "v1/instances/demo/backend/generate/abc"
    assert keys.instance_id_of(key) == 0xABC


def test_event_keys_and_prefixes() -> None:
    assert keys.events_prefix("demo") == "v1/events/demo/"
    assert keys.events_prefix("demo", "backend", "kv_events") == "v1/events/demo/backend/kv_events/"
    key = keys.event_key("demo", "backend", "kv_events", 255)
    assert key == "v1/events/demo/backend/kv_events/ff"
    assert keys.instance_id_of(key) == 255


def test_model_keys_escape_a_slash_in_the_name() -> None:
    assert keys.models_prefix() == MODELS_PREFIX == "v1/models/"
    assert keys.models_prefix("demo") == "v1/models/demo/"
    key = keys.model_key("demo", "org/model", 16, "demo.backend.generate")
    assert key == "v1/models/demo/org%2Fmodel/10/demo.backend.generate"
    assert card_key is keys.model_key  # model_card re-exports the one helper
    assert keys.model_name_of(key) == "org/model"


def test_keys_of_another_shape_are_not_misread() -> None:
    assert keys.instance_id_of("v1/instances/demo/backend/generate/not-hex") is None
    assert keys.instance_id_of("no-slash") is None
    assert keys.model_name_of("v1/instances/demo/backend/generate/1") is None
    assert keys.model_name_of("v1/models/demo/short") is None

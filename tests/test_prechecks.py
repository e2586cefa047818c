"""qwenvl.prechecks states facts about transformers that the front door uses without importing it: they must
match the installed transformers."""

from __future__ import annotations


def test_report_integrations_are_transformers_integrations():
    from transformers import integrations

    from qwenvl.prechecks import REPORT_INTEGRATIONS

    known = getattr(integrations, "integration_utils", integrations).INTEGRATION_TO_CALLBACK
    assert sorted(REPORT_INTEGRATIONS) == sorted(known)


def test_nothing_to_train_is_one_rule():
    from qwenvl.prechecks import nothing_to_train

    off = dict(tune_mm_vision=False, tune_mm_mlp=False, tune_mm_llm=False)
    assert nothing_to_train(**off, lora=False)
    assert not nothing_to_train(**off, lora=True)
    assert not nothing_to_train(**{**off, "tune_mm_mlp": True}, lora=False)

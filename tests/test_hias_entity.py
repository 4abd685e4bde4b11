"""`python -m model hias-entity`: HIAS's AI Model entity, validated against the model card."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from model.classifier import DEFAULT_ARTIFACT, read_card
from model.hias import model_entity
from tests.helpers import REPO

# Every attribute HIAS 3 writes for a model (hias-core src/var/www/html/AI/Classes/AI.php create_model,
# lines 123-449), in its order.
HIAS_ATTRIBUTES = [
    "id", "type", "category", "name", "description", "modelType", "modelLink", "modelAuthor", "modelAuthorLink",
    "modelAccuracy", "modelSpecificity", "modelPrecision", "modelAuc", "modelRecall", "modelTruePositives",
    "modelFalsePositives", "modelTrueNegatives", "modelFalseNegatives", "modelMisclassification",
    "networkArchitecture", "programmingLanguage", "programmingFramework", "programmingToolkit", "datasetName",
    "datasetType", "datasetLink", "datasetAuthor", "datasetAuthorLink", "dataAugmentation", "dataPositiveLabel",
    "dataNegativeLabel", "paperTitle", "paperAuthor", "paperDoi", "paperLink", "properties", "commands", "states",
    "state", "dateCreated", "dateModified",
]


def entity_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model", "hias-entity", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("variant", ["int8", "float32"])
def test_entity_carries_the_cards_held_out_figures(variant):
    run = entity_cli(str(DEFAULT_ARTIFACT.parent), "--variant", variant)
    assert run.returncode == 0, run.stderr
    entity = json.loads(run.stdout)
    card = read_card(DEFAULT_ARTIFACT.parent)
    figures = card["metrics"]["colour"][variant]
    assert [a for a in HIAS_ATTRIBUTES if a not in entity] == []
    assert entity["type"] == "Model" and entity["name"]["value"] == card["name"]
    for attribute, key in [("modelAccuracy", "accuracy"), ("modelSpecificity", "specificity"),
                           ("modelPrecision", "precision"), ("modelRecall", "sensitivity"), ("modelAuc", "roc_auc")]:
        assert float(entity[attribute]["value"]) == figures[key], attribute
        assert entity[attribute]["type"] == "Text"
        assert f"metrics.colour.{variant}" in entity[attribute]["metadata"]["source"]["value"]
        assert card["data"]["splits"]["test"]["file"] in entity[attribute]["metadata"]["source"]["value"]
    counts = {k: int(entity[f"model{name}"]["value"]) for k, name in
              [("tp", "TruePositives"), ("fp", "FalsePositives"), ("tn", "TrueNegatives"), ("fn", "FalseNegatives")]}
    assert counts == {k: figures[k] for k in counts} and sum(counts.values()) == figures["n"] == card["metrics"]["test_images"]
    assert int(entity["modelMisclassification"]["value"]) == figures["fp"] + figures["fn"]
    assert entity["modelVersion"]["value"] == card["version"]
    assert entity["modelSha256"]["value"] == card["artifacts"][variant]["sha256"]
    assert entity["datasetName"]["value"] == card["data"]["dataset"] and entity["datasetType"]["value"] == "JPG"
    assert entity["dataAugmentation"]["value"] is True
    assert "Diagnosis" in entity["properties"]["value"] and "active" in entity["states"]["value"]


def test_descriptive_attributes_can_be_set_but_figures_cannot():
    run = entity_cli("--set", "paperDoi=10.1000/example", "--set", "modelAuthor=Hospital lab")
    assert run.returncode == 0, run.stderr
    entity = json.loads(run.stdout)
    assert entity["paperDoi"]["value"] == "10.1000/example" and entity["modelAuthor"]["value"] == "Hospital lab"
    refused = entity_cli("--set", "modelAccuracy=0.999")
    assert refused.returncode == 1 and "only descriptive attributes" in refused.stderr
    assert entity_cli("--set", "paperDoi").returncode == 1


def test_the_id_is_stable_per_model_version_and_the_split_kind_is_named():
    card = read_card(DEFAULT_ARTIFACT.parent)
    assert model_entity(card)["id"] == model_entity(card)["id"] != model_entity(card | {"version": "other"})["id"]
    assert "grouped split" in model_entity(card)["modelAuc"]["metadata"]["source"]["value"]
    per_image = read_card(DEFAULT_ARTIFACT.parent.parent / "cellnet")
    assert "per-image split" in model_entity(per_image)["modelAuc"]["metadata"]["source"]["value"]
    with pytest.raises(ValueError, match="no held-out figures"):
        model_entity(card | {"metrics": {}})

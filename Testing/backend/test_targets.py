"""From prompts to targets: a table of real prompts (the reference's own and radiologists' phrasing)."""
from __future__ import annotations

import pytest

from citrusv_backend.errors import InputError
from citrusv_backend.volume.tasks.targets import DETECT_TEMPLATE, QUERY_TEMPLATE, detection_targets, parse_targets

pytestmark = pytest.mark.unit

PROMPTS = [
    # The reference's prompts (README, demo/citrusv_streamlit_app.py, eval data).
    ("Please help segment the liver in this scan.", ["liver"]),
    ("Please help segment the left lung in the given image.", ["left lung"]),
    ("Please provide a mask for lung infections in this image", ["lung infections"]),
    ("Please help segment the abnormal area in this scan.", ["abnormal area"]),
    ("Please segment the heart in the given scan.", ["heart"]),
    ("Please help segment the kidney in this scan.", ["kidney"]),
    ("Please help segment the spleen in this scan.", ["spleen"]),
    # Several targets.
    ("segment the liver and the spleen", ["liver", "spleen"]),
    ("Find the kidneys, the liver & the aorta.", ["kidneys", "liver", "aorta"]),
    ("outline the pancreas, the duodenum and the stomach in this CT", ["pancreas", "duodenum", "stomach"]),
    ("please segment the aorta, the esophagus and the trachea", ["aorta", "esophagus", "trachea"]),
    ("delineate the prostate and the bladder", ["prostate", "bladder"]),
    ("segment the liver; the spleen; the pancreas", ["liver", "spleen", "pancreas"]),
    ("segment the left kidney as well as the right kidney", ["left kidney", "right kidney"]),
    ("segment the brain tumor and edema", ["brain tumor", "edema"]),
    ("segment the liver and liver tumor", ["liver", "liver tumor"]),
    ("segment the kidney and kidney tumor", ["kidney", "kidney tumor"]),
    ("segment the left femur and right femur", ["left femur", "right femur"]),
    # Shared heads and laterality.
    ("segment the left and right kidneys", ["left kidney", "right kidney"]),
    ("segment the left and the right kidney", ["left kidney", "right kidney"]),
    ("segment the left and right atria", ["left atrium", "right atrium"]),
    ("segment the left and right ventricles", ["left ventricle", "right ventricle"]),
    ("segment the left and right adrenal glands", ["left adrenal gland", "right adrenal gland"]),
    ("contour the left and right parotid glands", ["left parotid gland", "right parotid gland"]),
    ("segment the left, middle and right hepatic veins", ["left hepatic vein", "middle hepatic vein", "right hepatic vein"]),
    ("segment the left and right lungs and the heart", ["left lung", "right lung", "heart"]),
    ("segment the upper and lower lobes of the left lung", ["upper lobe of the left lung", "lower lobe of the left lung"]),
    ("segment the left upper and lower lobes", ["left upper lobe", "left lower lobe"]),
    ("segment the right upper, middle and lower lobes", ["right upper lobe", "right middle lobe", "right lower lobe"]),
    ("segment the superior and inferior vena cava", ["superior vena cava", "inferior vena cava"]),
    ("segment the internal and external iliac arteries", ["internal iliac arteries", "external iliac arteries"]),
    ("segment the cervical, thoracic and lumbar vertebrae", ["cervical vertebrae", "thoracic vertebrae", "lumbar vertebrae"]),
    ("segment the lung and liver lesions", ["lung lesions", "liver lesions"]),
    ("segment both kidneys", ["left kidney", "right kidney"]),
    ("segment bilateral lungs", ["left lung", "right lung"]),
    # Shared modifiers before part names.
    ("segment the hepatic artery and vein", ["hepatic artery", "hepatic vein"]),
    ("segment the renal cortex and medulla", ["renal cortex", "renal medulla"]),
    # Compound names stay whole.
    ("segment the head and neck tumor", ["head and neck tumor"]),
    ("segment the head and neck cancer and the lymph nodes", ["head and neck cancer", "lymph nodes"]),
    ("segment the portal vein and splenic vein", ["portal vein and splenic vein"]),
    # A location qualifies its target and is not split.
    ("segment the lesion in the left lobe", ["lesion in the left lobe"]),
    ("segment the nodules in the left and right lungs", ["nodules in the left and right lungs"]),
    ("segment the tumor in the liver", ["tumor in the liver"]),
    ("segment the left lobe of the liver and the spleen", ["left lobe of the liver", "spleen"]),
    # Wording around the target.
    ("Segment the gallbladder.", ["gallbladder"]),
    ("Could you segment the urinary bladder in this MRI?", ["urinary bladder"]),
    ("segment the ovaries", ["ovaries"]),
    ("What is the largest organ here?", ["What is the largest organ here"]),
]


def test_the_table_is_large_enough():
    assert len(PROMPTS) >= 40


@pytest.mark.parametrize("prompt, names", PROMPTS, ids=[p for p, _ in PROMPTS])
def test_prompt_targets(prompt, names):
    targets = parse_targets(prompt)
    assert [t.name for t in targets] == names
    if prompt[0].isupper() and prompt.startswith("What"):
        assert targets[0].query == prompt  # not a segmentation request: asked as it is
    else:
        assert [t.query for t in targets] == [QUERY_TEMPLATE.format(target=n) for n in names]


@pytest.mark.parametrize("prompt, names", [
    ("heart", ["heart"]),
    ("the kidneys", ["kidneys"]),
    ("Please detect the liver in this image using json format.", ["liver"]),
    ("Please locate and detect the right lung in this image.", ["right lung"]),
    ("Please detect the left lung in this image, and return the cooresponging coordinates.", ["left lung"]),
    ("detect the left and right kidneys", ["left kidney", "right kidney"]),
])
def test_detection_prompts_use_the_reference_eval_template(prompt, names):
    targets = detection_targets(prompt)
    assert [t.name for t in targets] == names
    # eval/eval_detection.py, get_prompt_template('json'), verbatim.
    assert DETECT_TEMPLATE == "<image>\nLocate the {target}, output its bbox coordinates using JSON format."
    assert targets[0].query == f"<image>\nLocate the {names[0]}, output its bbox coordinates using JSON format."


def test_a_detection_question_is_asked_as_written():
    target = detection_targets("Is there a nodule?")[0]
    assert target.query == "Is there a nodule?" and target.query != target.detect_query()


def test_empty_prompts_are_refused():
    for parse in (parse_targets, detection_targets):
        with pytest.raises(InputError, match="empty"):
            parse("  ")
    with pytest.raises(InputError, match="no target"):
        parse_targets("segment the")

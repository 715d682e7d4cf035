"""Masked edits keep the unmasked pixels (serve_app/engine/composite.py and Runner.finish): the
feather weights, the composite, an inpaint through the tiny runners with and without
`preserve_unmasked`, and the wire field."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageDraw

from serve_app.api.protocol import ImageEditJsonRequest, ImageEditRequest, parse_request
from serve_app.engine.composite import keep_unmasked, repaint_weights
from serve_app.errors import InvalidRequestError
from tests.unit.test_edit_runners import edit_spec, input_mask, load, repaint_box
from tests.unit.test_runners import level_difference


def left_repaint(width: int = 40, height: int = 12, column: int = 20) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, column - 1, height - 1), fill=255)  # repaint x < column
    return mask


def test_weights_ramp_inside_the_repainted_area_only():
    weights = repaint_weights(left_repaint(), feather_px=3)
    row = weights[6]
    assert (row[20:] == 0).all()  # kept: the input, exactly
    assert row[19] == pytest.approx(0.25) and row[18] == pytest.approx(0.5) and row[17] == pytest.approx(0.75)
    assert (row[:17] == 1).all()  # deep inside: the model's own output
    assert (repaint_weights(left_repaint(), feather_px=0) == (np.asarray(left_repaint()) >= 128)).all()


def test_weights_measure_chessboard_distance_around_a_corner():
    mask = Image.new("L", (9, 9), 255)
    mask.putpixel((4, 4), 0)  # one kept pixel in the middle
    weights = repaint_weights(mask, feather_px=2)
    assert weights[4, 4] == 0
    assert weights[3, 3] == weights[5, 4] == pytest.approx(1 / 3)  # distance 1, diagonal or not
    assert weights[2, 6] == pytest.approx(2 / 3) and weights[0, 0] == 1


def test_composite_keeps_the_input_blends_the_band_and_keeps_the_output_inside():
    mask = left_repaint()
    original, output = Image.new("RGB", mask.size, (10, 200, 30)), Image.new("RGB", mask.size, (250, 0, 130))
    result = np.asarray(keep_unmasked(original, mask, output, feather_px=3)).astype(int)
    assert (result[:, 20:] == (10, 200, 30)).all()
    assert (result[:, :17] == (250, 0, 130)).all()
    assert (result[:, 18] == np.rint(np.array([10, 200, 30]) + 0.5 * np.array([240, -200, 100]))).all()


@pytest.mark.parametrize("model_id", ["tiny-sd", "tiny-flux"])
def test_an_inpaint_keeps_the_inputs_pixels_and_preserve_false_is_the_raw_output(model_id):
    """The raw output (preserve_unmasked False) is what diffusers' Inpaint pipeline returns
    (tests/unit/test_edit_runners.py); with it on, the kept region is the input's pixels, the
    repainted region away from the band is the raw output's, the band lies between."""
    from serve_app.engine.runners.base import run_together

    runner = load(model_id)[1]
    raw_spec = edit_spec(model_id, True)
    kept_spec = dataclasses.replace(raw_spec, preserve_unmasked=True)
    raw, kept = (np.asarray(image).astype(int) for image in run_together(runner, [raw_spec, kept_spec]))
    original = np.asarray(raw_spec.image).astype(int)
    repaint = np.asarray(input_mask()) >= 128
    feather = runner.model.edits.mask_feather_px
    x0, y0, x1, y1 = repaint_box()
    deep = np.zeros_like(repaint)
    deep[y0 + feather + 1: y1 - feather, x0 + feather + 1: x1 - feather] = True

    assert (kept[~repaint] == original[~repaint]).all()
    assert np.abs(raw[~repaint] - original[~repaint]).mean() > 5  # the tiny VAE does not reconstruct the input
    assert (kept[deep] == raw[deep]).all()
    band = repaint & ~deep
    low, high = np.minimum(original[band], raw[band]), np.maximum(original[band], raw[band])
    assert ((kept[band] >= low) & (kept[band] <= high)).all()
    print(f"{model_id}: kept region vs input 0 levels; raw output's kept region vs input "
          f"{level_difference(raw[~repaint], original[~repaint])} levels max")


def test_an_edit_without_a_mask_is_unchanged_by_preserve_unmasked():
    from serve_app.engine.runners.base import run_together

    runner = load("tiny-sd")[1]
    spec = edit_spec("tiny-sd", False)
    on, off = run_together(runner, [dataclasses.replace(spec, preserve_unmasked=True), spec])
    assert on.tobytes() == off.tobytes()


def test_preserve_unmasked_on_the_wire():
    assert parse_request(ImageEditRequest, {"model": "m", "prompt": "x"}).preserve_unmasked is None
    form = parse_request(ImageEditRequest, {"model": "m", "prompt": "x", "preserve_unmasked": "false"},
                         from_form=True)
    assert form.preserve_unmasked is False
    body = {"model": "m", "prompt": "x", "images": [{"image_url": "data:,"}], "preserve_unmasked": True}
    assert parse_request(ImageEditJsonRequest, body).preserve_unmasked is True
    for bad in ("yes", 1, [], {}):
        with pytest.raises(InvalidRequestError) as caught:
            parse_request(ImageEditJsonRequest, {**body, "preserve_unmasked": bad})
        assert caught.value.param == "preserve_unmasked"

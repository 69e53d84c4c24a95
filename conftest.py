"""What the docstring examples under vlmask/ see (tests/conftest.py does not reach them).

``vl`` is the built-in model; ``ds`` a tiny real result on it (examples/shapes.png, one step,
every token masked, the image's tokens by row); ``text_only`` the same question without the
image; ``tmp`` a fresh temporary directory (a :class:`pathlib.Path`) for files an example writes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
QUESTION = "what color is the circle ?"


@pytest.fixture(scope="session")
def doctest_vl():
    import vlmask

    return vlmask.load_model()


@pytest.fixture(scope="session")
def doctest_ds(doctest_vl):
    import vlmask

    image = ROOT / "examples" / "shapes.png"
    return vlmask.sweep(doctest_vl, QUESTION, [image], mask="all", mask_unit="row", num_tokens=1, progress=False)


@pytest.fixture(scope="session")
def doctest_text_only(doctest_vl):
    import vlmask

    return vlmask.sweep(doctest_vl, QUESTION, mask="text", num_tokens=1, progress=False)


@pytest.fixture(autouse=True)
def _doctest_names(request: pytest.FixtureRequest) -> None:
    """Fill the namespace of doctests only: other tests do not build these."""
    if not isinstance(request.node, pytest.DoctestItem):
        return
    namespace = request.getfixturevalue("doctest_namespace")
    namespace["vl"] = request.getfixturevalue("doctest_vl")
    namespace["ds"] = request.getfixturevalue("doctest_ds")
    namespace["text_only"] = request.getfixturevalue("doctest_text_only")
    namespace["tmp"] = request.getfixturevalue("tmp_path")

import subprocess
import sys


def test_import_is_light():
    """`import idemrt` must not pull compressai or the models eagerly."""
    code = (
        "import sys, idemrt\n"
        "heavy = [m for m in ('compressai', 'torchvision', 'idemrt.models.codec', 'idemrt.api') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_error_hierarchy():
    import idemrt

    for name in ("BitstreamError", "CheckpointError", "ImageError", "DecodeError", "BackendError"):
        assert issubclass(getattr(idemrt, name), idemrt.IdemrtError)
    assert issubclass(idemrt.IdemrtError, Exception)


def test_unknown_attribute():
    import idemrt
    import pytest

    with pytest.raises(AttributeError):
        idemrt.no_such_thing

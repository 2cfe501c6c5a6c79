"""benchmarks/cnn_layouts.py: every layout trains to the same weights, and the report is written."""

import json

from benchmarks.cnn_layouts import main


def test_every_layout_trains_the_same_cnn(tmp_path, capsys):
    out = tmp_path / "layouts.json"
    variants = ("banded,lib,flax,blk4+blk2,blk4a+blk2a,rows4+rows2,im2colv,im2colv4,shift+im2colv,"
                "par,part+par")
    assert main(["--variants", variants, "--clients", "2", "--steps", "2", "--batch", "4",
                 "--repeats", "1", "--shape", "12,12,1", "--channels", "3,4", "--dense", "8",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["rows"]] == variants.split(",")
    assert all(r["cpu_s_per_step"] > 0 for r in report["rows"])
    for line in capsys.readouterr().out.splitlines():
        if "max |param - banded|" in line:
            assert float(line.rsplit(" ", 1)[1]) < 1e-4, line


def test_results_never_replace_an_earlier_file(tmp_path):
    out = tmp_path / "layouts.json"
    out.write_text("earlier")
    try:
        main(["--variants", "banded", "--json", str(out)])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("an existing results file was accepted")
    assert out.read_text() == "earlier"

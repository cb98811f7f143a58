"""What the workflows collect and publish, offline: the CI report folder and the release notes."""

from __future__ import annotations

import json

from stages.common import ci, names


def test_collect_run_copies_the_run_record_and_adds_image_sizes(tmp_path):
    run = tmp_path / "run"
    (run / names.MANIFESTS_DIR).mkdir(parents=True)
    (run / names.MANIFESTS_DIR / "merge.json").write_text("{}")
    (run / names.SUMMARY_MD).write_text("# run\n")
    (run / "merged").mkdir()  # artifacts stay out of the report
    dest = tmp_path / "report"
    dest.mkdir()
    (dest / "stale.txt").write_text("from an earlier run")
    images = {"merge": {"image": "kiln-merge", "size_bytes": 2.5e9, "user": "kiln"}}
    summary = ci.collect_run(run, dest, images)
    assert sorted(p.name for p in dest.iterdir()) == sorted([names.MANIFESTS_DIR, names.SUMMARY_MD, "images.json"])
    assert json.loads((dest / "images.json").read_text()) == images
    assert summary.startswith("# run\n") and "| kiln-merge | 2.50 GB | kiln |" in summary
    assert "stopped early" in ci.collect_run(tmp_path / "empty", dest, None)


def test_release_notes_name_every_image_by_digest():
    refs = ci.registry_refs("ghcr.io/Some-Owner/", {"train": "kiln-train", "merge": "kiln-merge"})
    assert refs == {"train": "ghcr.io/some-owner/kiln-train", "merge": "ghcr.io/some-owner/kiln-merge"}
    assert [r["file"] for r in ci.release_matrix(refs)["include"]] == [
        "images/train.Dockerfile",
        "images/merge.Dockerfile",
    ]
    notes = ci.release_notes(refs, {"train": "sha256:aa", "merge": "sha256:bb"}, "1.2.0", "abc123", "o/kiln")
    assert "Built from abc123." in notes
    assert "| merge | `ghcr.io/some-owner/kiln-merge:1.2.0` | `sha256:bb` |" in notes
    assert "gh attestation verify oci://ghcr.io/some-owner/kiln-train@sha256:aa -R o/kiln" in notes

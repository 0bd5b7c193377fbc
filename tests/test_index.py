"""The annotations parser on MTAT's exact format, the tag sets, the splits, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mtt.data.index import build_index
from mtt.data.mtat import CLIP_INFO_COLUMNS, FOLDERS, AnnotationError, read_annotations, read_clip_info
from mtt.data.tags import TAGS, TOP50, top_by_frequency


def mtat_line(fields) -> str:
    """One line as MTAT writes it: tab-separated, every field in double quotes."""
    return "\t".join(f'"{f}"' for f in fields) + "\n"


def write_mtat_csv(path: Path, rows) -> None:
    """rows: (clip_id, set of tags, mp3_path)."""
    text = mtat_line(["clip_id", *TAGS, "mp3_path"])
    for clip_id, tags, mp3 in rows:
        text += mtat_line([clip_id, *("1" if t in tags else "0" for t in TAGS), mp3])
    path.write_text(text)


def tree_rows(per_folder: dict[str, int]):
    rows, clip_id = [], 2
    for folder in FOLDERS:
        for k in range(per_folder.get(folder, 0)):
            tags = {TOP50[(clip_id + j) % 50] for j in range(2)} if k % 5 else set()
            rows.append((clip_id, tags, f"{folder}/artist-album-{k:02d}-title-{29 * k}-{29 * k + 29}.mp3"))
            clip_id += 3  # ids are increasing but not contiguous, as in MTAT
    return rows


def test_reads_the_real_format(tmp_path):
    path = tmp_path / "annotations_final.csv"
    write_mtat_csv(path, [(2, {"guitar", "classical"}, "f/a-b-01-c-0-29.mp3"), (6, set(), "0/x-y-02-z-30-59.mp3")])
    assert path.read_text().startswith('"clip_id"\t"no voice"\t"singer"')
    ids, tags, labels, paths = read_annotations(path)
    assert tags == TAGS and len(tags) == 188
    assert ids.tolist() == [2, 6]
    assert paths == ("f/a-b-01-c-0-29.mp3", "0/x-y-02-z-30-59.mp3")
    assert labels.shape == (2, 188) and labels.dtype == np.uint8
    assert {TAGS[j] for j in np.flatnonzero(labels[0])} == {"guitar", "classical"}
    assert labels[1].sum() == 0


def test_standard_split_counts_on_a_16_folder_tree(tmp_path):
    per_folder = {f: 10 + i for i, f in enumerate(FOLDERS)}
    rows = tree_rows(per_folder)
    write_mtat_csv(tmp_path / "annotations_final.csv", rows)
    index = build_index(tmp_path, split="standard", drop_untagged=False)
    counts = {s: len(index.splits[s]) for s in ("train", "valid", "test")}
    assert counts == {
        "train": sum(10 + i for i in range(12)),
        "valid": 10 + 12,
        "test": sum(10 + i for i in range(13, 16)),
    }
    folders = {s: {index.paths[r][0] for r in index.splits[s]} for s in counts}
    assert folders == {"train": set("0123456789ab"), "valid": {"c"}, "test": set("def")}


def test_drop_untagged_follows_the_tag_set(tmp_path):
    rows = tree_rows({f: 10 for f in FOLDERS})
    write_mtat_csv(tmp_path / "annotations_final.csv", rows)
    kept = build_index(tmp_path, tags="top50", drop_untagged=True)
    everything = build_index(tmp_path, tags="top50", drop_untagged=False)
    n_untagged = sum(1 for _, t, _ in rows if not t)
    assert sum(len(v) for v in everything.splits.values()) - sum(len(v) for v in kept.splits.values()) == n_untagged
    assert kept.tags == TOP50 and kept.labels.shape[1] == 50
    for rows_ in kept.splits.values():
        assert kept.labels[rows_].any(axis=1).all()


def test_report_split_is_first_quarter_test(tmp_path):
    rows = tree_rows({f: 5 for f in FOLDERS})  # 80 rows
    write_mtat_csv(tmp_path / "annotations_final.csv", rows)
    index = build_index(tmp_path, split="report", drop_untagged=False)
    assert index.splits["test"].tolist() == list(range(20))
    assert index.splits["train"].tolist() == list(range(20, 80))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda lines: [lines[0].replace('"mp3_path"', '"path"')] + lines[1:], "missing column 'mp3_path'"),
        (lambda lines: [lines[0], lines[1].replace('"0"', '"2"', 1)] + lines[2:], "expected 0 or 1"),
        (lambda lines: lines + [lines[1]], "duplicate clip_id"),
        (lambda lines: [lines[0], lines[1].replace("f/a-b", "../../etc/a-b")] + lines[2:], "escapes the audio root"),
        (lambda lines: [lines[0], lines[1].replace("f/a-b", "/etc/a-b")] + lines[2:], "escapes the audio root"),
        (lambda lines: [lines[0], lines[1].rsplit("\t", 3)[0] + "\n"] + lines[2:], "fields, header has"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, mutate, message):
    path = tmp_path / "annotations_final.csv"
    write_mtat_csv(path, [(2, {"guitar"}, "f/a-b-01-c-0-29.mp3"), (5, {"piano"}, "0/d-e-01-f-0-29.mp3")])
    lines = mutate(path.read_text().splitlines(keepends=True))
    path.write_text("".join(lines))
    with pytest.raises(AnnotationError, match=message) as err:
        read_annotations(path)
    assert str(path) in str(err.value)
    assert any(f"{path}:{n}:" in str(err.value) for n in (1, 2, 4)), "the line number is named"


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotations_final.csv"):
        build_index(tmp_path)


CLIP_INFO_LINES = [
    [
        "clip_id",
        "track_number",
        "title",
        "artist",
        "album",
        "url",
        "segmentStart",
        "segmentEnd",
        "original_url",
        "mp3_path",
    ],
    [
        "2",
        "1",
        "BWV54 - I Aria",
        "American Bach Soloists",
        "J.S. Bach Solo Cantatas",
        "http://www.magnatune.com/artists/albums/abs-bachsolo/",
        "30",
        "59",
        "http://he3.magnatune.com/all/01--BWV54%20-%20I%20Aria--ABS.mp3",
        "f/american_bach_soloists-j_s__bach_solo_cantatas-01-bwv54__i_aria-30-59.mp3",
    ],
    [
        "6",
        "1",
        "BWV54 - I Aria",
        "American Bach Soloists",
        "J.S. Bach Solo Cantatas",
        "http://www.magnatune.com/artists/albums/abs-bachsolo/",
        "88",
        "117",
        "http://he3.magnatune.com/all/01--BWV54%20-%20I%20Aria--ABS.mp3",
        "f/american_bach_soloists-j_s__bach_solo_cantatas-01-bwv54__i_aria-88-117.mp3",
    ],
]


def write_clip_info_csv(path: Path, lines=CLIP_INFO_LINES) -> None:
    path.write_text("".join(mtat_line(fields) for fields in lines))


def test_reads_the_real_clip_info_format(tmp_path):
    path = tmp_path / "clip_info_final.csv"
    write_clip_info_csv(path)
    assert path.read_text().startswith('"clip_id"\t"track_number"\t"title"\t"artist"')
    info = read_clip_info(path)
    assert sorted(info) == [2, 6]
    assert info[6]["artist"] == "American Bach Soloists" and info[6]["segmentStart"] == "88"
    assert info[2]["mp3_path"].endswith("-30-59.mp3")
    assert set(info[2]) == set(CLIP_INFO_COLUMNS) - {"clip_id"}


def test_reads_generated_clip_info(tmp_path):
    from mtt.data.mtat import write_clip_info

    row = dict(zip(CLIP_INFO_LINES[0], CLIP_INFO_LINES[1]))
    write_clip_info(tmp_path / "c.csv", [row, {**row, "clip_id": "9", "title": 'say "hi"\tthere'}])
    info = read_clip_info(tmp_path / "c.csv")
    assert info[9]["title"] == 'say "hi"\tthere', "quotes and tabs inside a quoted field survive"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda ls: [[c for c in ls[0] if c != "artist"], *[r[:3] + r[4:] for r in ls[1:]]], r"missing column.*artist"),
        (lambda ls: [ls[0], ["x", *ls[1][1:]], ls[2]], "is not an integer"),
        (lambda ls: [ls[0], ls[1], ls[1]], "duplicate clip_id 2"),
        (lambda ls: [ls[0], ls[1][:-1] + ["../x.mp3"], ls[2]], "escapes the audio root"),
        (lambda ls: [ls[0], ls[1][:-2], ls[2]], "fields, header has"),
    ],
)
def test_bad_clip_info_names_file_and_line(tmp_path, mutate, message):
    path = tmp_path / "clip_info_final.csv"
    write_clip_info_csv(path, mutate(CLIP_INFO_LINES))
    with pytest.raises(AnnotationError, match=message) as err:
        read_clip_info(path)
    assert any(f"{path}:{n}:" in str(err.value) for n in (1, 2, 3))


def test_frequency_tag_set_counts_the_annotations(tmp_path):
    # guitar on 3 clips, piano and flute on 2 each (a tie: header order decides), sitar on 1.
    rows = [
        (2, {"guitar", "piano"}, "0/a.mp3"),
        (3, {"guitar", "flute"}, "1/b.mp3"),
        (4, {"guitar", "piano", "flute", "sitar"}, "2/c.mp3"),
        (5, set(), "3/d.mp3"),
    ]
    write_mtat_csv(tmp_path / "annotations_final.csv", rows)
    index = build_index(tmp_path, tags="freq3", drop_untagged=False)
    ties = sorted(["piano", "flute"], key=TAGS.index)
    assert index.tags == ("guitar", *ties)
    assert index.labels.sum(axis=0).tolist() == [3, 2, 2]
    assert index.labels[3].sum() == 0
    with pytest.raises(ValueError, match="freq999"):
        build_index(tmp_path, tags="freq999")
    with pytest.raises(ValueError, match="top50' or 'freqN"):
        build_index(tmp_path, tags="top5x")


def test_top50_stays_the_published_list(tmp_path):
    # A tree where the most frequent tags are NOT the published top 50: top50 ignores that.
    rows = [(i, {"lol", "rap"}, f"{FOLDERS[i % 16]}/x{i}.mp3") for i in range(2, 10)]
    write_mtat_csv(tmp_path / "annotations_final.csv", rows)
    index = build_index(tmp_path, tags="top50", drop_untagged=False)
    assert index.tags == TOP50 and index.labels.sum() == 0
    assert build_index(tmp_path, tags="freq2", drop_untagged=False).tags == tuple(
        sorted(["lol", "rap"], key=TAGS.index)
    )


def test_top_by_frequency_with_uint8_labels():
    labels = np.zeros((300, 3), dtype=np.uint8)
    labels[:, 2] = 1
    labels[:10, 0] = 1
    assert top_by_frequency(("a", "b", "c"), labels, 3) == ("c", "a", "b")

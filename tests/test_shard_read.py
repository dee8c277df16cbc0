"""The shard-folder reader: dataset.json, a tar's index (its .idx or its headers), members read by name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from xdctools.errors import DataError
from xdctools.shard import format as fmt
from xdctools.shard.read import (
    decode_npy,
    header_index,
    locations,
    parse_index,
    read_dataset_json,
    read_index,
    read_samples,
    split_member,
    tar_index,
)
from xdctools.shard.write import ShardWriter


def _info(video: int, segment: int) -> bytes:
    fields = dict.fromkeys(fmt.INFO_FIELDS, 0) | {"video": video, "segment": segment, "label": video % 2}
    return fmt.encode_info(**fields)


@pytest.fixture
def tars(tmp_path: Path) -> list[Path]:
    """Two tars of 2 videos x 2 segments: info, json and a small mel per sample, each with its .idx."""
    out = []
    (tmp_path / "train").mkdir()
    for unit in range(2):
        with ShardWriter(tmp_path / "train", f"train-{unit:06d}") as writer:
            for video in (2 * unit, 2 * unit + 1):
                writer.write_video(
                    [
                        [
                            (f"{key}.{fmt.INFO_EXT}", _info(video, s)),
                            (f"{key}.{fmt.META_EXT}", json.dumps({"key": key}).encode()),
                            (
                                f"{key}.{fmt.MEL_EXT}",
                                fmt.npy_bytes(np.full((fmt.N_MELS, 3), video, np.float32)),
                            ),
                        ]
                        for s in range(2)
                        for key in [fmt.make_key(video, f"c/v{video}.mp4", s)]
                    ]
                )
        out.append(tmp_path / "train" / f"train-{unit:06d}-00.tar")
    return out


def test_split_member_cuts_at_the_first_dot_of_the_base_name() -> None:
    assert split_member("v1_a_s000.mel.npy") == ("v1_a_s000", "mel.npy")
    assert split_member("dir.x/key.json") == ("dir.x/key", "json")
    assert split_member("noext") == ("noext", "")


def test_the_idx_and_the_tar_headers_give_the_same_index(tars: list[Path]) -> None:
    idx = tar_index(tars[0])
    assert idx == header_index(tars[0])
    assert [key for key, _ in idx] == [fmt.make_key(v, f"c/v{v}.mp4", s) for v in (0, 1) for s in (0, 1)]
    assert set(idx[0][1]) == {fmt.INFO_EXT, fmt.META_EXT, fmt.MEL_EXT}
    tars[1].with_suffix(".idx").unlink()
    assert [loc.key for loc in locations(tars)][4:] == [key for key, _ in header_index(tars[1])]


def test_read_samples_gives_the_members_asked_for_in_order(tars: list[Path]) -> None:
    samples = list(read_samples(locations(tars), [fmt.MEL_EXT, fmt.INFO_EXT, "webm"]))
    assert [s.info["video"] for s in samples] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert list(samples[0].members) == [fmt.INFO_EXT, fmt.MEL_EXT]  # file order, absent ones left out
    mel = samples[5].decode(fmt.MEL_EXT, decode_npy)
    assert mel.shape == (fmt.N_MELS, 3) and float(mel[0, 0]) == 2.0
    assert samples[0].meta == {} and samples[0].video_ext is None


def test_errors_name_the_file_and_the_member(tars: list[Path]) -> None:
    key, members = tar_index(tars[1])[1]
    offset, size = members[fmt.MEL_EXT]
    raw = bytearray(tars[1].read_bytes())
    raw[offset : offset + size] = bytes(size)
    tars[1].write_bytes(bytes(raw))
    sample = list(read_samples(locations(tars), [fmt.MEL_EXT]))[5]
    with pytest.raises(DataError, match=re.escape(f"{tars[1]}: member {key}.mel.npy cannot be read (")):
        sample.decode(fmt.MEL_EXT, decode_npy)
    with pytest.raises(DataError, match=re.escape(f"{tars[1]}: member {key}.json cannot be read (KeyError")):
        sample.decode(fmt.META_EXT, json.loads)

    tars[1].write_bytes(bytes(raw[: offset + 10]))  # cut inside the member
    with pytest.raises(
        DataError, match=re.escape(f"{tars[1]}: member {key}.mel.npy cannot be read (ValueError")
    ):
        list(read_samples(locations(tars), [fmt.MEL_EXT]))

    idx = tars[0].with_suffix(".idx")
    idx.write_text(idx.read_text().replace("v1.2 4", "v1.2 5"))
    with pytest.raises(DataError, match=re.escape(f"{idx}: not a DALI index: header says 5 samples")):
        read_index(idx)
    tars[0].unlink()
    with pytest.raises(DataError, match=re.escape(f"{tars[0]}: shard missing")):
        list(locations(tars))


def test_parse_index_says_what_is_wrong() -> None:
    assert parse_index("v1.2 1\ninfo.npy 512 128 k.info.npy json 1536 20 k.json\n") == [
        ("k", {"info.npy": (512, 128), "json": (1536, 20)})
    ]
    for text, message in [
        ("", "first line is not 'v1.x <samples>'"),
        ("v1.2 1\ninfo.npy 512 128\n", "line 2 is not 'ext offset size name' groups"),
        ("v1.2 1\ninfo.npy x 128 k.info.npy\n", "line 2: offset/size of k.info.npy are not integers"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_index(text)


def test_dataset_json_is_checked_once(tmp_path: Path) -> None:
    path = tmp_path / "dataset.json"
    assert read_dataset_json(tmp_path) is None
    path.write_text(json.dumps({"classes": ["a", "b"], "sets": {"train": {}}}))
    assert read_dataset_json(tmp_path) == {"classes": ["a", "b"], "sets": {"train": {}}}
    for doc, message in [
        ('{"sets": ', "unreadable (JSONDecodeError"),
        ("[]", "not a JSON object"),
        ('{"sets": []}', "'sets' is not a mapping"),
        ('{"classes": [1, 2]}', "'classes' is not a list of names"),
    ]:
        path.write_text(doc)
        with pytest.raises(DataError, match=re.escape(f"{path}: {message}")):
            read_dataset_json(tmp_path)

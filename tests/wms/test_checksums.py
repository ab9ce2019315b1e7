"""wms.checksums: content checksums as ``<algorithm>:<hex>``, checked against zlib/hashlib."""

from __future__ import annotations

import hashlib
import zlib

import pytest

from wms import checksums

SAMPLES = [b"", b"a", b"Wikipedia", b"\x00" * 10, bytes(range(256)) * 300]


@pytest.mark.parametrize("data", SAMPLES, ids=lambda d: f"{len(d)}B")
def test_adler32_matches_zlib(data):
    assert checksums.bytes_checksum(data) == f"adler32:{zlib.adler32(data):08x}"
    assert checksums.bytes_checksum(data, "adler32") == f"adler32:{zlib.adler32(data):08x}"


def test_adler32_known_values():
    assert checksums.bytes_checksum(b"") == "adler32:00000001"
    assert checksums.bytes_checksum(b"Wikipedia") == "adler32:11e60398"  # the textbook example


@pytest.mark.parametrize("data", SAMPLES, ids=lambda d: f"{len(d)}B")
@pytest.mark.parametrize("algorithm", ["sha256", "md5"])
def test_hashlib_algorithms_match_hashlib(data, algorithm):
    expected = hashlib.new(algorithm, data).hexdigest()
    assert checksums.bytes_checksum(data, algorithm) == f"{algorithm}:{expected}"


def test_sha256_known_value():
    assert checksums.bytes_checksum(b"abc", "sha256") == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


@pytest.mark.parametrize("algorithm", ["adler32", "sha256", "md5"])
def test_streaming_in_chunks_equals_one_piece(algorithm):
    data = bytes(range(256)) * 1000
    chunks = [data[i : i + 777] for i in range(0, len(data), 777)]
    assert checksums.bytes_checksum_stream(chunks, algorithm) == checksums.bytes_checksum(
        data, algorithm
    )


def test_unknown_algorithm_is_refused():
    with pytest.raises(ValueError, match="crc32"):
        checksums.bytes_checksum(b"x", "crc32")


@pytest.mark.parametrize("algorithm", ["adler32", "sha256", "md5"])
def test_file_checksum(tmp_path, algorithm):
    data = bytes(range(256)) * 5000 + b"tail"  # > one chunk with the small chunk size below
    path = tmp_path / "payload.root"
    path.write_bytes(data)
    if algorithm == "adler32":
        expected = f"adler32:{zlib.adler32(data):08x}"
    else:
        expected = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
    assert checksums.file_checksum(path, algorithm) == expected
    assert checksums.file_checksum(str(path), algorithm, chunk=4096) == expected


def test_file_checksum_default_is_adler32_and_empty_file(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert checksums.file_checksum(path) == "adler32:00000001"


def test_file_checksum_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        checksums.file_checksum(tmp_path / "nope")


@pytest.mark.parametrize(
    "value",
    [
        "adler32:00000001",
        "adler32:0a1b2c3d",
        "sha256:" + "0123456789abcdef" * 4,
        "md5:" + "d41d8cd98f00b204e9800998ecf8427e",
    ],
)
def test_is_valid_accepts(value):
    assert checksums.is_valid(value) is True


@pytest.mark.parametrize(
    "value",
    [
        "",
        None,
        "0a1b2c3d",  # no algorithm
        "adler32:",  # no digest
        "adler32:0a1b2c3",  # 7 hex
        "adler32:0a1b2c3d0",  # 9 hex
        "adler32:0A1B2C3D",  # upper case
        "ADLER32:0a1b2c3d",
        "adler32:0a1b2c3g",  # not hex
        "sha256:" + "0" * 63,
        "sha256:" + "0" * 65,
        "sha256:" + "0" * 8,  # an adler32-sized digest under another name
        "md5:" + "0" * 64,
        "crc32:0a1b2c3d",
        " adler32:0a1b2c3d",
        "adler32:0a1b2c3d\n",
        "adler32 0a1b2c3d",
        "3f2504e0-4f89-11d3-9a0c-0305e82c3301",  # the seed's uuid "checksum"
    ],
)
def test_is_valid_refuses(value):
    assert checksums.is_valid(value) is False


@pytest.mark.parametrize("algorithm", ["adler32", "sha256", "md5"])
def test_what_it_computes_is_valid(algorithm):
    assert checksums.is_valid(checksums.bytes_checksum(b"event data", algorithm))

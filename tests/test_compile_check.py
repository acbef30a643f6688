"""Every kernel compiles ahead of time for an H100 (sm_90a), with no GPU: no
compile error, no register spill, shared memory within 227 KiB per block, at
the recommended size in every flag variant and at the corners of the size
matrix in the hardest variant (``python -m mammoth_fast.compile_check`` checks
every variant everywhere); and the bf16 dots run on tensor cores. Runs
whether or not conftest switched on the interpreter (the check then compiles
in a child process without it)."""
from mammoth_fast.compile_check import SIZE_MATRIX, failures, format_table, parse_size, run_checks


def test_kernels_compile_for_h100():
    rows = run_checks(hardest_beyond_recommended=True)
    failed = failures(rows)
    assert not failed, "\n".join([format_table(rows), *failed])
    assert {size for r in rows for size in r["sizes"]} == {s.describe() for s in SIZE_MATRIX}
    # tensor_cores is None where neither cuobjdump nor nvdisasm is at hand
    no_tc = [r for r in rows if r["dtypes"] == ["bfloat16"] and r["tensor_cores"] is False]
    assert not no_tc, "bf16 dots without HMMA/HGMMA:\n" + format_table(no_tc)


def test_sizes_flag_parses_and_refuses_invalid_sizes():
    import argparse

    import pytest

    size = parse_size("din=1536,d=1024,c=768,h=1,e=1,s=16")
    assert (size.dh, size.do, size.r) == (768, 1024, 219)
    assert parse_size("din=64,d=32,c=32,h=2,e=3,s=4,r=5").r == 5
    for bad in ("din=64,d=33,c=32,h=2,e=3,s=4", "din=64,d=32,c=32,h=2,e=3,s=4,x=1", "din=1024,d=256,c=512,h=4,e=8,s=4"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)

"""Every kernel compiles ahead of time for an H100 (sm_90a), with no GPU: no
compile error, no register spill, shared memory within 227 KiB per block; and
the bf16 dots run on tensor cores. Runs whether or not conftest switched on
the interpreter (the check then compiles in a child process without it)."""
from mammoth_fast.compile_check import failures, format_table, run_checks


def test_kernels_compile_for_h100():
    rows = run_checks()
    failed = failures(rows)
    assert not failed, "\n".join([format_table(rows), *failed])
    # tensor_cores is None where neither cuobjdump nor nvdisasm is at hand
    no_tc = [r for r in rows if r["dtypes"] == ["bfloat16"] and r["tensor_cores"] is False]
    assert not no_tc, "bf16 dots without HMMA/HGMMA:\n" + format_table(no_tc)

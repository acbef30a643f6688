"""pytest plugin of ``benchmarks.gpu_check``: each failure is written, with its
traceback, to the file named by GPU_CHECK_FAILURES the moment it is reported,
so that a test run cut short by its time limit still says what failed and why.
Loaded with ``-p benchmarks._pytest_live``; with pytest-xdist the reports reach
the controlling process, which writes them."""
import os


def pytest_runtest_logreport(report):
    path = os.environ.get("GPU_CHECK_FAILURES")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller writes
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"FAILED {report.nodeid} ({report.when}, {report.duration:.1f} s)\n{report.longreprtext}\n\n")

"""The one exception class of the data layer."""


class DataError(ValueError):
    """Bad input data: a missing or unreadable features file, a bag that cannot be
    used (empty, wrong width, NaN/Inf), a label table or split file that does not
    fit. The message names the file or slide at fault, so a command line can print
    it alone, without a traceback."""

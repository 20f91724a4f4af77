"""User-facing errors: the CLI prints these as one clear message, never a traceback."""


class RecsysError(Exception):
    """An error the user can fix (bad input, bad settings, missing files)."""


class DataValidationError(RecsysError):
    """Input data does not match the expected schema.

    Carries the file and column so the message tells the user exactly where to look.
    """

    def __init__(self, path: object, column: str | None, problem: str) -> None:
        self.path = str(path)
        self.column = column
        self.problem = problem
        where = f"{self.path}, column '{column}'" if column else self.path
        super().__init__(f"{where}: {problem}")


class ArtifactError(RecsysError):
    """An artifact directory is missing, incomplete or fails its checksums."""

"""The base of every config section (services/config.py, services/config_data.py): unknown keys are errors."""

from pydantic import BaseModel, ConfigDict


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

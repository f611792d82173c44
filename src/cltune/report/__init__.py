"""Reports read data only (metrics.json, train logs, eda.json, resolved config) and never import training code."""

from cltune.report.tables import print_summary
from cltune.report.write import write_report

__all__ = ["print_summary", "write_report"]

"""Renderers: turn the report dictionary into JSON, HTML, SARIF and terminal text.

They read the plain dictionary of :meth:`gradscope.report.Report.to_dict` and
never import torch.
"""

"""pystream-report: the HTML report, from saved results alone."""

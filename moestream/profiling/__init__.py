"""Where time and bytes go: the recorder every part writes to, traces, summaries, reports, plots."""

"""Where time and bytes go: the recorder every part writes to, routing traces, profile summaries,
reports and plots. On the ground floor: it imports nothing of the runtime."""

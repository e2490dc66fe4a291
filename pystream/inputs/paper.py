"""The paper's reference numbers and settings (Xiao et al., ICLR 2024), as plain data: the paper experiment takes
its settings from here and the results / report put our numbers beside these."""

# Table 1: Llama-2-13B, 65K tokens of PG19, cache 1024 (sink: 4+1020).
PPL = {"setting": "Llama-2-13B, 65K tokens of PG19 (Table 1)", "cache": "1024",
       "window": 5158.07, "sink": 5.40, "recompute": 5.43}
# Table 2: Llama-2-7B, x sinks + 4092 window, 400K tokens of PG19; PPL by number of sinks.
SINKS = {"setting": "Llama-2-7B, cache x+4092, 400K tokens of PG19 (Table 2)",
         "values": {0: 3359.95, 1: 11.88, 2: 10.51, 4: 9.59, 8: 9.54}}
# Table 6: Llama-2-7B, 4 sinks, 400K tokens of PG19; PPL by capacity.
CACHE = {"setting": "Llama-2-7B, 4 sinks, 400K tokens of PG19 (Table 6)",
         "values": {512: 9.73, 1024: 9.32, 2048: 9.08, 4096: 9.59}}

PAPER = {"ppl": PPL, "sinks": SINKS, "cache": CACHE}

# The sink counts the paper compares at a fixed capacity (Table 2): the experiment's part 2 runs the same ones.
SINK_COUNTS = tuple(SINKS["values"])
# The paper's sink count (4+1020 and friends).
PAPER_SINKS = 4

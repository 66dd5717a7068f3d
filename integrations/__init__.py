"""loraforge's glue for training frameworks (`loraforge.integrations.axolotl`: the Axolotl plugin).

Nothing is imported here: each integration pulls in its own framework only when it is used.
"""

"""The s2s server. Importing it limits glibc's malloc arenas first (see ``memory``)."""

from s2s.server.memory import limit_malloc_arenas

limit_malloc_arenas()

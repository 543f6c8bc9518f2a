"""--processes N: the process group and the sockets its members answer each other on."""

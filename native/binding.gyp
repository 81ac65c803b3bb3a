{
  "target_defaults": {
    "defines": ["NAPI_EXPERIMENTAL"],
    "cflags_cc": ["-O2", "-std=c++17", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
    "ldflags": ["-Wl,-z,now"]
  },
  "targets": [
    {
      "target_name": "vmshift",
      "sources": [
        "src/args.cc",
        "src/fd.cc",
        "src/mmap.cc",
        "src/socket.cc",
        "src/watch.cc",
        "src/bulk.cc",
        "src/hash.cc",
        "src/postcopy.cc",
        "src/blkio.cc",
        "src/stream.cc",
        "src/module.cc"
      ]
    },
    {
      "target_name": "vmshift_bench_ref",
      "sources": ["bench-ref.cc"]
    }
  ]
}

{
  "targets": [
    {
      "target_name": "vmshift",
      "sources": ["vmshift.cc"],
      "cflags_cc": ["-O2", "-std=c++17", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-cast-function-type"]
    },
    {
      "target_name": "vmshift_bench_ref",
      "sources": ["bench-ref.cc"],
      "cflags_cc": ["-O2", "-std=c++17", "-Wall", "-Wno-cast-function-type"]
    }
  ]
}

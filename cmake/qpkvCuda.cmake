# qpkv_cuda_target(<target>): options for our own .cu translation units (tests, benchmarks, the
# example). Host-compiler warnings go through -Xcompiler so nvcc never sees -Wall/-Werror itself;
# Eigen (the CPU reference in the tests) needs --expt-relaxed-constexpr, floods nvcc warning 20012
# and carries nvcc-only pragmas that g++ reports as unknown. With QPKV_WERROR the host compiler's
# warnings are errors, as for the C++ targets (cmake/qpkvWarnings.cmake).
function(qpkv_cuda_target target)
  # CMake 3.25 does not know nvcc 13's C++20 flag (CUDA_STANDARD 20 fails to generate): pass it.
  target_link_libraries(${target} PRIVATE qpkv::qpkv CUDA::cudart)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20 --expt-relaxed-constexpr -diag-suppress=20012 -Xcompiler=-Wall,-Wextra,-Wno-unknown-pragmas>)
  if(QPKV_WERROR AND NOT MSVC)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Werror>)
  endif()
endfunction()

# qpkv_enable_warnings(<target> [WERROR])
# Our own translation units (tests, examples, benchmarks) build with -Wall -Wextra -Wpedantic.
# With WERROR, warnings become errors when QPKV_WERROR is ON (scripts/test turns it on; it stays
# off by default so a newer compiler's new warning never breaks a user's build). The qpkv
# INTERFACE target itself carries no warning flags.
function(qpkv_enable_warnings target)
  cmake_parse_arguments(PARSE_ARGV 1 arg "WERROR" "" "")
  if(MSVC)
    target_compile_options(${target} PRIVATE /W4 /permissive-)
    if(arg_WERROR AND QPKV_WERROR)
      target_compile_options(${target} PRIVATE /WX)
    endif()
  else()
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic)
    if(arg_WERROR AND QPKV_WERROR)
      target_compile_options(${target} PRIVATE -Werror)
    endif()
  endif()
endfunction()

# cmake -P script run by the ctest test "install_consumer" (tests/CMakeLists.txt):
#   1. install the configured qpkv build tree to a fresh prefix under QPKV_WORK_DIR,
#   2. configure + build tests/consumer (find_package(qpkv REQUIRED), builds examples/quickstart.cpp)
#      with CMAKE_PREFIX_PATH = that prefix (the parent build's prefix path follows via the env),
#   3. run the consumer's quickstart binary.
# Prints "qpkv-consumer-test: SKIPPED" (a ctest skip) while examples/quickstart.cpp does not exist.
#
# Inputs (-D): QPKV_SOURCE_DIR QPKV_BINARY_DIR QPKV_WORK_DIR QPKV_CONFIG QPKV_GENERATOR
#              QPKV_MAKE_PROGRAM QPKV_CXX_COMPILER QPKV_EIGEN3_DIR QPKV_PREFIX_PATH ("|"-separated)
cmake_minimum_required(VERSION 3.21)

foreach(var QPKV_SOURCE_DIR QPKV_BINARY_DIR QPKV_WORK_DIR QPKV_GENERATOR)
  if(NOT ${var})
    message(FATAL_ERROR "qpkv-consumer-test: -D${var}=... is required")
  endif()
endforeach()

set(quickstart ${QPKV_SOURCE_DIR}/examples/quickstart.cpp)
if(NOT EXISTS ${quickstart})
  message("qpkv-consumer-test: SKIPPED (${quickstart} does not exist yet)")
  return()
endif()

set(prefix ${QPKV_WORK_DIR}/prefix)
set(build ${QPKV_WORK_DIR}/build)
file(REMOVE_RECURSE ${prefix} ${build})  # no stale headers, no cached qpkv_DIR

function(run step)
  list(JOIN ARGN " " command_line)
  message("qpkv-consumer-test: ${step}: ${command_line}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "qpkv-consumer-test: ${step} failed (${rc})")
  endif()
endfunction()

set(config_args)
if(QPKV_CONFIG)
  set(config_args --config ${QPKV_CONFIG})
endif()
run(install ${CMAKE_COMMAND} --install ${QPKV_BINARY_DIR} --prefix ${prefix} ${config_args})

# The parent's CMAKE_PREFIX_PATH (for Eigen & co.) goes through the environment, which find_package
# searches after the CMAKE_PREFIX_PATH variable, i.e. after our prefix.
if(QPKV_PREFIX_PATH)
  if(CMAKE_HOST_WIN32)
    set(sep ";")
  else()
    set(sep ":")
  endif()
  string(REPLACE "|" "${sep}" env_path "${QPKV_PREFIX_PATH}")
  if(DEFINED ENV{CMAKE_PREFIX_PATH})
    string(APPEND env_path "${sep}$ENV{CMAKE_PREFIX_PATH}")
  endif()
  set(ENV{CMAKE_PREFIX_PATH} "${env_path}")
endif()
set(configure_args
    -S ${QPKV_SOURCE_DIR}/tests/consumer -B ${build} -G ${QPKV_GENERATOR}
    -DCMAKE_PREFIX_PATH=${prefix}
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
    -DQPKV_QUICKSTART=${quickstart}
    -DQPKV_EXPECTED_PREFIX=${prefix})
if(QPKV_CONFIG)
  list(APPEND configure_args -DCMAKE_BUILD_TYPE=${QPKV_CONFIG})
endif()
foreach(pair "CMAKE_MAKE_PROGRAM;QPKV_MAKE_PROGRAM" "CMAKE_CXX_COMPILER;QPKV_CXX_COMPILER"
             "Eigen3_DIR;QPKV_EIGEN3_DIR")
  list(GET pair 0 to)
  list(GET pair 1 from)
  if(${from})
    list(APPEND configure_args -D${to}=${${from}})
  endif()
endforeach()
run(configure ${CMAKE_COMMAND} ${configure_args})
run(build ${CMAKE_COMMAND} --build ${build} ${config_args})

find_program(binary quickstart PATHS ${build} ${build}/${QPKV_CONFIG} NO_DEFAULT_PATH REQUIRED)
run(run ${binary})
message("qpkv-consumer-test: passed")
